"""The CLI and config validation: overrides, clean exit on SIGTERM, sample/eval modes, one error per bad field."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpoints, config_validation, from_config, main, train
from ddpm_jax.models import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
# Same persistent XLA cache as test_train: the CLI subprocess reuses the tiny step compiled in-process.
CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                  os.path.join(tempfile.gettempdir(), "ddpm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def load_config(name: str):
    """A shipped config by name; 'file:argument' passes the argument to get_config (as config_flags does)."""
    file, _, argument = name.partition(":")
    return from_config.load_config_file(CONFIGS / f"{file}.py", argument or None)


def cli(workdir, *flags) -> list[str]:
    return [sys.executable, "-m", "ddpm_jax.main", f"--config={CONFIGS / 'tiny.py'}", f"--workdir={workdir}", *flags]


# --------------------------------------------------------------------------
# The command line.


def test_cli_override_applies_and_sigterm_exits_cleanly(tmp_path):
    """--config.training.num_train_steps reaches the run; SIGTERM saves the current step and exits with 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen(cli(tmp_path, "--config.training.num_train_steps=100000",
                                   "--config.training.log_every=1"),
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 500
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no training step logged in time"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    saved = checkpoints.load_item(str(tmp_path), "state")[2]
    assert saved >= logged[-1]  # the step in flight when the signal came is saved too
    assert saved < 100000
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["config"]["training"]["num_train_steps"] == 100000


def test_cli_rejects_a_misspelled_override(tmp_path):
    result = subprocess.run(cli(tmp_path, "--config.training.num_train_stepz=5"), cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode != 0
    assert "num_train_stepz" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step tiny run: (config, workdir)."""
    config = load_config("tiny")
    config.training.num_train_steps = 3
    config.training.save_every = 3
    workdir = str(tmp_path_factory.mktemp("trained"))
    train.train_and_evaluate(config, workdir)
    return config, workdir


def test_sample_mode_writes_a_deterministic_grid(trained):
    config, workdir = trained
    ema = checkpoints.load_ema_params(workdir)
    merged = main.merged_config(ema.config, config)
    path = main.sample(merged, ema.params, ema.step, workdir)
    first = np.load(path.replace(".png", ".npz"))["samples"]
    assert first.shape == (8, 8, 8, 1) and np.all(np.isfinite(first))
    # 8 images of 8×8 in a 3×3 grid with 1-pixel padding, enlarged 8×: (3·9 + 1)·8 pixels a side.
    assert Image.open(path).size == (224, 224)
    main.sample(merged, ema.params, ema.step, workdir)
    np.testing.assert_array_equal(np.load(path.replace(".png", ".npz"))["samples"], first)


def test_eval_mode_reports_the_bound_in_bits_per_dim(trained):
    config, workdir = trained
    ema = checkpoints.load_ema_params(workdir)
    result = main.evaluate(main.merged_config(ema.config, config), ema.params, ema.step, workdir)
    assert (result["num_examples"], result["num_steps"], result["step"]) == (16, 10, 3)
    # L_vlb = L_T + Σ L_{t−1} + L_0 with every term >= 0 (KLs, and −log of a probability).
    assert np.isfinite(result["bpd"]) and result["bpd"] > result["prior_bpd"] >= 0
    main.write_eval_result(result, workdir)  # main() prints the result first, then writes it
    with open(os.path.join(workdir, "eval", "nll_00000003.json"), encoding="utf-8") as f:
        assert json.load(f) == result


def test_merged_config_keeps_the_trained_model_and_takes_the_given_sampling(trained):
    config, _ = trained
    given = load_config("tiny")
    given.model.ch = 64  # ignored: the weights fix the model
    given.sampling.num_steps = 5
    merged = main.merged_config(checkpoints.config_from_json(checkpoints.run_metadata(config)["config"]), given)
    assert (merged.model.ch, merged.sampling.num_steps) == (8, 5)


def test_a_config_written_before_a_field_was_added_reads_back_valid(trained):
    """A checkpoint's config from before a field existed gets the value it was trained with (ADDED_FIELDS)."""
    config, _ = trained
    tree = checkpoints.run_metadata(config)["config"]
    del tree["training"]["ordered_allreduce"], tree["training"]["async_checkpointing"]
    old = checkpoints.config_from_json(tree)
    assert (old.training.ordered_allreduce, old.training.async_checkpointing) == (False, True)
    expected = config.to_dict()
    expected["training"]["async_checkpointing"] = True
    assert main.merged_config(old, None).to_dict() == expected
    tree["training"]["ordered_allreduce"] = True  # a stored value wins over the default
    assert checkpoints.config_from_json(tree).training.ordered_allreduce is True


# --------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("name", ["cifar10", "highres256:celebahq", "highres256:church", "highres256:bedroom", "digits",
                                  "tiny"])
def test_shipped_configs_are_valid_on_a_tpu_v3_8(name):
    config_validation.validate_config(load_config(name), process_count=1, local_device_count=8)


@pytest.mark.parametrize("name, millions", [("cifar10", 35.7), ("highres256:church", 114)])
def test_paper_models_have_the_published_size(name, millions):
    """Ho et al. 2020, Appendix B: 35.7M parameters for CIFAR-10, 114M for the 256×256 models."""
    config = load_config(name)
    abstract = jax.eval_shape(functools.partial(train.create_train_state, config), jax.random.PRNGKey(0))
    assert round(count_params(abstract.params) / 1e6, 1 if millions < 100 else 0) == millions


BAD_FIELDS = [
    ("data.dataset", "cifar100", r"data\.dataset must be one of"),
    ("data.dataset", "moons", r"data\.dataset must be an image dataset"),
    ("data.image_size", 16, r"data\.image_size for digits must be None or 8"),
    ("data.worker_count", -1, r"data\.worker_count must be an int >= 0"),
    ("model.ch_mult", (1, 2, 2, 2, 2),
     r"data\.image_size must be a positive multiple of 2\*\*\(len\(ch_mult\)-1\) = 16"),
    ("model.num_groups", 3, r"model\.num_groups must be an int >= 1 dividing ch=8"),
    ("model.attn_resolutions", (16,), r"model\.attn_resolutions must be a subset of the resolutions \[8, 4\]"),
    ("diffusion.schedule", "cosin", r"diffusion\.schedule must be one of \['linear', 'cosine'"),
    ("diffusion.num_timesteps", 0, r"diffusion\.num_timesteps must be an int >= 1"),
    ("diffusion.schedule_kwargs.beta_end", 1.5, r"diffusion\.schedule_kwargs\.beta_end must be a number in the open interval"),
    ("diffusion.schedule_kwargs.gamma", 1.0, r"diffusion\.schedule_kwargs: invalid arguments for schedule 'linear'"),
    ("diffusion.variance", "learnt", r"diffusion\.variance must be one of"),
    ("diffusion.variance", "analytic", r"diffusion\.variance must be one of .* sampling-time choice"),
    ("diffusion.mean_type", "score", r"diffusion\.mean_type must be one of \['eps', 'x0', 'v'\]"),
    ("diffusion.loss_type", "l1", r"diffusion\.loss_type must be one of \['simple', 'hybrid', 'vlb'\]"),
    ("diffusion.loss_type", "hybrid", r"diffusion: loss_type='hybrid' trains the variance"),
    ("training.batch_size", 0, r"training\.batch_size must be an int >= 1"),
    ("training.lr", 0.0, r"training\.lr must be a float > 0"),
    ("training.lr", float("nan"), r"training\.lr must be a float > 0"),
    ("training.warmup_steps", 1.5, r"training\.warmup_steps must be an int >= 0"),
    ("training.ema_decay", 1.0, r"training\.ema_decay must be a float in \[0, 1\)"),
    ("training.dropout", -0.1, r"training\.dropout must be a float in \[0, 1\)"),
    ("training.bf16", 1, r"training\.bf16 must be True or False"),
    ("training.ordered_allreduce", "yes", r"training\.ordered_allreduce must be True or False"),
    ("training.async_checkpointing", None, r"training\.async_checkpointing must be True or False"),
    ("training.max_consecutive_nonfinite", 0, r"training\.max_consecutive_nonfinite must be an int >= 1"),
    ("sampling.num_steps", 101, r"sampling\.num_steps must be an int >= 1 and <= 100"),
    ("sampling.variance", "learned_range", r"sampling\.variance must be one of \['fixed_large', 'fixed_small'\] for a model trained with"),
    ("sampling.eta", 0.5, r"sampling\.variance must be 'fixed_small' when sampling\.eta is set"),
    ("eval.split", "validation", r"eval\.split must be one of \['train', 'test'\]"),
]


@pytest.mark.parametrize("path, value, message", BAD_FIELDS, ids=[f"{p}={v!r}" for p, v, _ in BAD_FIELDS])
def test_each_bad_field_gives_one_error_naming_it(path, value, message):
    # Without type safety, so wrongly typed values (bf16=1) reach the validator as they would from a dict.
    config = ml_collections.ConfigDict(load_config("tiny").to_dict(), type_safe=False)
    *groups, field = path.split(".")
    node = config
    for group in groups:
        node = node[group]
    node[field] = value
    with pytest.raises(ValueError, match=message):
        config_validation.validate_config(config, process_count=1, local_device_count=1)


def test_global_batch_must_split_over_all_devices():
    config = load_config("tiny")  # global batch 16
    config_validation.validate_config(config, process_count=2, local_device_count=8)
    with pytest.raises(ValueError, match=r"training\.batch_size must be a multiple of .* = 24"):
        config_validation.validate_config(config, process_count=3, local_device_count=8)


def test_unknown_and_missing_fields_are_named():
    config = load_config("tiny")
    with pytest.raises(AttributeError):  # the shipped configs are locked: a typo cannot even be set
        config.training.warmup = 5
    config.training.unlock()
    config.training.warmup = 5
    with pytest.raises(ValueError, match=r"training\.warmup is not a config field; training has \["):
        config_validation.validate_config(config, process_count=1, local_device_count=1)
    config = load_config("tiny")
    config.unlock()
    del config["eval"]
    with pytest.raises(ValueError, match=r"missing: \['eval'\]"):
        config_validation.validate_config(config, process_count=1, local_device_count=1)
