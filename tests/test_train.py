"""The train step and loop on the tiny config (digits, ~40k-parameter UNet, T = 100, batch 16).

All loop tests share one compiled step (same model and optimizer settings), and
the XLA programs go to a persistent cache that the 8-device subprocess reuses.
"""

import functools
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

from ddpm_jax import checkpoints, data, from_config, schedules, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Compiling the tiny UNet's step takes ~30 s of CPU; runs of the same program reuse it across processes.
CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                  os.path.join(tempfile.gettempdir(), "ddpm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

N = 4  # the resumed runs stop at N and continue to 2N


def tiny_config(**training):
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "experiments" / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.training.num_train_steps = 2 * N
    config.training.save_every = N
    config.training.log_every = 1
    for name, value in training.items():
        config.training[name] = value
    return config


def losses_of(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_bitwise_equal(a, b) -> None:
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def patched_batches(monkeypatch, transform) -> None:
    """Wraps data.get_dataset so transform(step, batch) sees (and may change) each batch, step = global index."""
    get_dataset = data.get_dataset

    def wrapped(*args, start_step=0, **kwargs):
        for step, batch in enumerate(get_dataset(*args, start_step=start_step, **kwargs), start=start_step):
            yield transform(step, batch)

    monkeypatch.setattr(data, "get_dataset", wrapped)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 2N-step run with checkpoints at N and 2N: (workdir, final state)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, train.train_and_evaluate(tiny_config(), workdir)


# --------------------------------------------------------------------------
# The pure step.


def test_step_skips_nonfinite_updates_and_keeps_ema_equation():
    config = tiny_config(ema_decay=0.9)
    mesh = train.make_mesh()
    state = train.replicate(jax.device_get(train.create_train_state(config, jax.random.PRNGKey(0))), mesh)
    schedule = train.replicate(from_config.build_schedule(config), mesh)
    rng = train.replicate(jax.random.PRNGKey(1), mesh)
    images = next(data.get_dataset("digits", "train", batch_size=16, seed=0))["image"]
    step = lambda s, x: train.parallel_train_step(s, train.shard_batch(x, mesh), rng, schedule,
                                                  hyper=train.step_config(config), mesh=mesh)

    before = jax.device_get(state)
    state, metrics = step(state, np.full_like(images, np.nan))
    after = jax.device_get(state)
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
    for name in ("params", "ema_params", "opt_state"):  # the update is skipped entirely
        assert_bitwise_equal(getattr(after, name), getattr(before, name))
    assert (int(after.step), int(after.nonfinite_count), int(after.consecutive_nonfinite)) == (1, 1, 1)

    # Two finite steps (the first has lr = 0 under warm-up): the run continues and the counter resets.
    for _ in range(2):
        previous = jax.device_get(state)
        state, metrics = step(state, images)
    current = jax.device_get(state)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
    assert (int(current.step), int(current.nonfinite_count), int(current.consecutive_nonfinite)) == (3, 1, 0)
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(current.params), leaves(previous.params)))
    # EMA (Ho et al. §4): ema ← d·ema + (1 − d)·params, in float64 NumPy.
    for e_new, e_old, p in zip(leaves(current.ema_params), leaves(previous.ema_params), leaves(current.params)):
        np.testing.assert_allclose(e_new, 0.9 * e_old.astype(np.float64) + 0.1 * p, rtol=1e-6, atol=1e-7)


_MEAN_OVER_DEVICES = """
import json, jax, numpy as np
from jax.sharding import PartitionSpec as P
from ddpm_jax import train
mesh = train.make_mesh()
x = np.random.RandomState(0).standard_normal((8, 5, 3)).astype(np.float32) * 10.0 ** np.arange(3)
def run(ordered):
    f = lambda v: train.mean_over_devices({"g": v[0]}, ordered)["g"]
    out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(train.AXIS), out_specs=P()))(x)
    return np.asarray(out), [np.asarray(s.data).tolist() for s in out.addressable_shards]
(ordered, ordered_shards), (pmean, _) = run(True), run(False)
print(json.dumps(dict(x=x.tolist(), ordered=ordered.tolist(), pmean=pmean.tolist(), shards=ordered_shards)))
"""


def test_mean_over_devices_ordered_and_pmean_both_average_over_eight_devices():
    """Both reductions give the mean over devices (float64 reference) on every device; they agree to rounding."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", _MEAN_OVER_DEVICES], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    reference = np.mean(np.asarray(out["x"], np.float64), axis=0)
    for name in ("ordered", "pmean"):
        np.testing.assert_allclose(out[name], reference, rtol=1e-6, err_msg=name)
    assert len(out["shards"]) == 8 and all(shard == out["ordered"] for shard in out["shards"])


# --------------------------------------------------------------------------
# The loop.


def test_short_run_lowers_the_loss(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=80, save_every=80), str(tmp_path))
    logged = losses_of(str(tmp_path))
    losses = np.array([logged[s] for s in range(1, 81)])
    # The UNet's last conv starts at zero, so the first loss is mean(ε²) over 16·64 values: 1 ± 0.044.
    assert abs(losses[0] - 1.0) < 0.2
    assert losses[-10:].mean() < 0.7 * losses[:10].mean()


def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, uninterrupted):
    workdir, expected = uninterrupted
    first = train.train_and_evaluate(tiny_config(num_train_steps=N), str(tmp_path))
    assert int(first.step) == N
    resumed = train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert_bitwise_equal(resumed, expected)
    assert losses_of(str(tmp_path)) == losses_of(workdir)


def test_sigterm_saves_the_current_step_and_resumes_exactly(tmp_path, monkeypatch, uninterrupted):
    _, expected = uninterrupted
    previous_handler = signal.getsignal(signal.SIGTERM)

    def send_sigterm(step, batch):
        if step == 5:  # arrives while the batch of step 6 is being fetched
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    patched_batches(monkeypatch, send_sigterm)
    stopped = train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert int(stopped.step) == 6  # the step in flight finishes, is saved, nothing is lost
    assert signal.getsignal(signal.SIGTERM) is previous_handler
    manager = checkpoints.make_manager(str(tmp_path), read_only=True)
    assert manager.latest_step() == 6
    manager.close()

    monkeypatch.undo()
    assert_bitwise_equal(train.train_and_evaluate(tiny_config(), str(tmp_path)), expected)


def test_damaged_newest_checkpoint_resumes_from_the_older_one(tmp_path, uninterrupted, caplog):
    workdir, expected = uninterrupted
    # A copy at a new path: TensorStore caches, per path, the bytes this process wrote.
    shutil.copytree(workdir, tmp_path / "run")
    state_dir = tmp_path / "run" / checkpoints.CHECKPOINT_DIR / str(2 * N) / "state"
    biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)

    resumed = train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
    assert any(f"step {2 * N} " in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert_bitwise_equal(resumed, expected)  # steps N+1..2N were retrained identically


def test_nan_batches_skip_updates_then_stop_with_a_clear_error(tmp_path, monkeypatch):
    nan_from = 2  # batches 2, 3, 4, ... are NaN; max_consecutive_nonfinite = 3 in the tiny config
    patched_batches(monkeypatch, lambda step, batch: dict(batch, image=np.full_like(batch["image"], np.nan))
                    if step >= nan_from else batch)
    config = tiny_config(num_train_steps=20, save_every=2, log_every=5)
    with pytest.raises(FloatingPointError, match=r"step 5: .* 3 consecutive steps .*max_consecutive_nonfinite = 3"):
        train.train_and_evaluate(config, str(tmp_path))

    good, _, step_good = checkpoints.load_item(str(tmp_path), "state", step=2)
    last, _, step_last = checkpoints.load_item(str(tmp_path), "state")
    assert (step_good, step_last) == (2, 4)
    assert_bitwise_equal(last["params"], good["params"])  # the skipped steps left the parameters alone
    assert (int(last["nonfinite_count"]), int(last["consecutive_nonfinite"])) == (2, 2)
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        row = json.loads(f.read().splitlines()[-1])  # the stopping step is logged before the error
    assert (row["step"], row["skipped"], row["nonfinite_count"], row["consecutive_nonfinite"]) == (5, 3, 3, 3)


def test_eight_devices_match_one_device(uninterrupted, tmp_path):
    """The same global batch on 8 simulated CPU devices and on 1: same losses and parameters (1e-5)."""
    workdir, _ = uninterrupted
    devices = 8 if jax.device_count() == 1 else 1
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "ddpm_jax.main", f"--config={ROOT / 'experiments/configs/tiny.py'}",
               f"--workdir={tmp_path}", f"--config.training.num_train_steps={N}", f"--config.training.save_every={N}",
               "--config.training.log_every=1"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    other = losses_of(str(tmp_path))
    mine = losses_of(workdir)
    np.testing.assert_allclose([other[s] for s in range(1, N + 1)], [mine[s] for s in range(1, N + 1)],
                               rtol=0, atol=1e-5)
    other_state, _, _ = checkpoints.load_item(str(tmp_path), "state", step=N)
    my_state, _, _ = checkpoints.load_item(workdir, "state", step=N)
    for x, y in zip(leaves(other_state["params"]), leaves(my_state["params"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# The step's pieces against independent references (fast: no UNet).


def test_training_draws_every_t_uniformly_including_zero():
    """Ho Algorithm 1: t ~ Uniform{1..T} (zero-based {0..T−1}); chi-square of 20,000 draws against uniform."""
    T, n = 10, 20_000
    t, noise, _ = jax.jit(train.per_example_randomness, static_argnums=(3, 4))(
        jax.random.PRNGKey(0), np.int32(3), np.arange(n), T, (2,))
    counts = np.bincount(np.asarray(t), minlength=T)
    assert len(counts) == T and counts[0] > 0, f"t = 0 (the paper's t = 1, the decoder step) never drawn: {counts}"
    assert stats.chisquare(counts).pvalue > 1e-4, counts
    z = np.asarray(noise).ravel()  # and the noise is N(0, 1)
    assert stats.kstest(z, "norm").pvalue > 1e-4


def test_adam_step_size_follows_the_warm_up_schedule():
    """Adam with a constant gradient moves each parameter by lr_k (m̂/√v̂ = 1), so update k is lr·min(k, W)/W."""
    lr, warmup = 0.5, 4
    optimizer = train.make_optimizer(lr, warmup, grad_clip=1e9)
    params = {"w": np.zeros(3, np.float32)}
    state = optimizer.init(params)
    grads = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    for k in range(warmup + 3):
        updates, state = optimizer.update(grads, state, params)
        expected = lr * min(k, warmup) / warmup
        np.testing.assert_allclose(np.abs(updates["w"]), expected, rtol=1e-5, atol=1e-7, err_msg=f"step {k}")
        assert np.all(np.sign(updates["w"]) * np.sign(grads["w"]) <= 0)  # descent
        np.testing.assert_allclose(float(train.learning_rate_fn(lr, warmup)(k)), expected, rtol=1e-6)


class _SqrtAtZero(nn.Module):
    """out = w·x + 0·√v: with v = 0 the loss is finite but ∂/∂v = 0·∞ = NaN; with v = 1 every gradient is finite."""

    v0: float

    @nn.compact
    def __call__(self, x, t, train=False):
        w = self.param("w", lambda key: np.float32(0.5))
        v = self.param("v", lambda key: np.float32(self.v0))
        return w * x + 0.0 * jax.numpy.sqrt(v)


def _tiny_step(v0):
    model = _SqrtAtZero(v0)
    optimizer = train.make_optimizer(1e-2, 0, 1.0)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 2, 2, 1), np.float32), np.zeros(1, np.int32))["params"]
    zero = np.zeros((), np.int32)
    state = train.TrainState(step=np.int32(5), params=params, ema_params=params, opt_state=optimizer.init(params),
                             nonfinite_count=np.int32(2), consecutive_nonfinite=zero)
    step = functools.partial(train.train_step, model=model, schedule=schedules.get_schedule("linear", 50),
                             optimizer=optimizer, lr_fn=train.learning_rate_fn(1e-2, 0), ema_decay=0.9,
                             loss_type="simple", variance="fixed_small", mean_type="eps")
    mesh = train.make_mesh(jax.devices()[:1])
    run = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(train.AXIS), P()), out_specs=(P(), P())))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 2, 2, 1)).astype(np.float32)
    return state, run(state, images, jax.random.PRNGKey(1))


def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_update():
    before, (after, metrics) = _tiny_step(0.0)
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["skipped"]) == 1
    for name in ("params", "ema_params", "opt_state"):  # bit for bit: no NaN reached the state
        assert_bitwise_equal(getattr(after, name), getattr(before, name))
    assert (int(after.step), int(after.nonfinite_count), int(after.consecutive_nonfinite)) == (6, 3, 1)
    # Control: the same model with v = 1 has finite gradients and is updated.
    before, (after, metrics) = _tiny_step(1.0)
    assert int(metrics["skipped"]) == 0 and float(after.params["w"]) != float(before.params["w"])
    assert (int(after.step), int(after.nonfinite_count), int(after.consecutive_nonfinite)) == (6, 2, 0)
