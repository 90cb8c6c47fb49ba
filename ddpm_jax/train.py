"""Training: the TrainState, a pure data-parallel train step (Ho et al. 2020, Algorithm 1) and the loop.

Parallelism: `jax.shard_map` over a 1-D mesh of every device (axis 'batch'),
inside one `jax.jit`. We use shard_map rather than pmap because pmap is in
maintenance mode since JAX 0.8 (it is now built on shard_map), shard_map takes
global arrays (one code path for one host or many, no replicate/unreplicate),
and the per-device program is explicit: each device computes the gradient of
its slice, and `lax.pmean` averages gradients and metrics over the batch axis
(or, with training.ordered_allreduce, an all-gather and a sum in device order:
see `mean_over_devices`).

Layout invariance: every random draw is per EXAMPLE, from
fold_in(fold_in(rng, step), b) with b the example's index in the global batch,
and the model runs under vmap over examples (so dropout masks are per example
too). A global batch therefore gives the same update on 1 device or 8, up to
float summation order. With the same number of devices, split over 1 process
or several, the per-device programs are the same (on CPU only with the same
XLA thread-pool size in every process, PJRT_NPROC: it sets how loops are split
over threads), and ordered_allreduce makes the sum over devices the same too:
the runs are then bit-identical (tests/test_multiprocess.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ddpm_jax import checkpoints, config_validation, data, diffusion, from_config, losses, resume, sampling, schedules
from ddpm_jax.models import UNet
from ddpm_jax.utils import images as image_grid
from ddpm_jax.utils.signals import StopRequest
from ddpm_jax.utils.writers import MetricWriter, drop_metrics_after

Array = jax.Array
AXIS = "batch"
# THREEFRY_NOTE: every random draw here is per parameter or per example, never
# one array sharded over devices, so the partitionable threefry buys nothing;
# the classic one compiles 2-5x faster on CPU (30 s -> 6 s for the tiny UNet's
# init). Both are deterministic functions of the key.


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 []: batches consumed, applied or skipped
    params: Any
    ema_params: Any  # exponential moving average of params, used for sampling (Ho §4)
    opt_state: Any
    nonfinite_count: Array  # int32 []: updates skipped because the loss or gradient was not finite
    consecutive_nonfinite: Array  # int32 []: skipped in a row (0 after any applied update)


# --------------------------------------------------------------------------
# The optimizer and the initial state (model and schedule: ddpm_jax.from_config).


def learning_rate_fn(lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to lr over warmup_steps updates, then constant (Ho et al., Appendix B)."""
    if warmup_steps == 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup_steps)


def make_optimizer(lr: float, warmup_steps: int, grad_clip: float) -> optax.GradientTransformation:
    """Adam after clipping the gradient's global norm to grad_clip (Ho et al.'s setup)."""
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate_fn(lr, warmup_steps)))


def create_train_state(config: ml_collections.ConfigDict, rng: Array) -> TrainState:
    """Fresh parameters (ema_params = params), Adam state and zero counters, on the default device."""
    t = config.training
    with jax.threefry_partitionable(False):  # see THREEFRY_NOTE
        return _init_state(rng, model=from_config.build_model(config), image_shape=from_config.image_shape(config),
                           optimizer_args=(t.lr, t.warmup_steps, t.grad_clip))


# Jitted with hashable static arguments so that runs with the same model reuse one compiled init.
@functools.partial(jax.jit, static_argnames=("model", "image_shape", "optimizer_args"))
def _init_state(rng: Array, *, model: UNet, image_shape: tuple[int, int, int],
                optimizer_args: tuple[float, int, float]) -> TrainState:
    x = jnp.zeros((1, *image_shape))
    params = model.init(rng, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
    opt_state = make_optimizer(*optimizer_args).init(params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema_params=params, opt_state=opt_state, nonfinite_count=zero,
                      consecutive_nonfinite=zero)


# --------------------------------------------------------------------------
# The pure step.


def per_example_randomness(rng: Array, step: Array, example_ids: Array, num_timesteps: int,
                           example_shape: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """t ~ Uniform{0..T−1}, ε ~ N(0, I) and a dropout key for each example, from fold_in(fold_in(rng, step), b).

    Returns t int32 [b], noise [b, *example_shape], dropout keys [b].
    """
    step_key = jax.random.fold_in(rng, step)

    def one(b):
        t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, b), 3)
        t = jax.random.randint(t_key, (), 0, num_timesteps)
        return t, jax.random.normal(noise_key, example_shape), dropout_key

    return jax.vmap(one)(example_ids)


def mean_over_devices(tree: Any, ordered: bool) -> Any:
    """The mean of `tree` over the mesh axis AXIS (inside shard_map); invariant over the axis.

    ordered=False: `lax.pmean`, an all-reduce whose summation order is the
    backend's (in-memory within a process, a ring or tree over gloo/NCCL across
    processes), so the same devices split over other processes can round
    differently. ordered=True: all-gather every device's value and sum over
    the gathered axis in one program, the same whatever the process layout.
    It moves n_devices × the tree instead of reducing it in place.
    """
    if not ordered:
        return jax.lax.pmean(tree, AXIS)
    gathered = jax.lax.all_gather(tree, AXIS, to="invarying")
    return jax.tree.map(lambda g: jnp.sum(g, axis=0) / g.shape[0], gathered)


def train_step(state: TrainState, images: Array, rng: Array, *, model: UNet, schedule: schedules.Schedule,
               optimizer: optax.GradientTransformation, lr_fn: optax.Schedule, ema_decay: float,
               loss_type: str, variance: str, mean_type: str,
               ordered_allreduce: bool = False) -> tuple[TrainState, dict[str, Array]]:
    """Ho Algorithm 1 on this device's slice images [b, H, W, C] of the global batch; runs under shard_map.

    Gradients and metrics are averaged over the mesh axis AXIS (`mean_over_devices`). When the loss or
    the gradient's global norm is not finite, params, Adam state and EMA are kept
    (the update is skipped) and the non-finite counters grow; the step counter
    always advances, so the data position and the rng stay in step with it.
    """
    b = images.shape[0]
    example_ids = jax.lax.axis_index(AXIS) * b + jnp.arange(b)
    t, noise, dropout_keys = per_example_randomness(rng, state.step, example_ids, schedule.num_timesteps,
                                                    images.shape[1:])

    def loss_fn(params):
        x_t = diffusion.q_sample(schedule, images, t, noise)
        # Per-example apply so each example's dropout mask depends on its own key only.
        apply = lambda x, s, k: model.apply({"params": params}, x[None], s[None], train=True,
                                            rngs={"dropout": k})[0]
        output = jax.vmap(apply)(x_t, t, dropout_keys)
        terms = losses.training_losses(schedule, output, images, t, noise, loss_type=loss_type,
                                       variance=variance, mean_type=mean_type)
        return jnp.mean(terms["loss"]), terms

    # Differentiate w.r.t. a device-varying copy: the gradient is then this
    # device's own, and the explicit mean below averages it (a gradient w.r.t.
    # the invariant params would be summed over devices implicitly).
    local_params = jax.lax.pcast(state.params, AXIS, to="varying")
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
    grads, loss = mean_over_devices((grads, loss), ordered_allreduce)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(weights):
        params, ema_params, opt_state = weights
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, params)
        return params, ema_params, opt_state

    # lax.cond runs only the taken branch: the skipped update costs nothing and an applied
    # one no extra pass. A jnp.where over params, EMA and both Adam moments read the old and
    # the new copy of each and wrote it again every step (CIFAR-10 UNet, 2-core CPU: the
    # update took 0.24 s that way, 0.20 s with the cond; the state is bit-identical).
    params, ema_params, opt_state = jax.lax.cond(finite, update, lambda weights: weights,
                                                 (state.params, state.ema_params, state.opt_state))
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
        nonfinite_count=state.nonfinite_count + skipped,
        consecutive_nonfinite=(state.consecutive_nonfinite + 1) * skipped,
    )
    metrics = mean_over_devices({name: jnp.mean(value) for name, value in terms.items() if name != "loss"},
                                ordered_allreduce)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=lr_fn(state.step - state.nonfinite_count),
                   skipped=skipped, nonfinite_count=new_state.nonfinite_count,
                   consecutive_nonfinite=new_state.consecutive_nonfinite)
    return new_state, metrics


# --------------------------------------------------------------------------
# Placement on the mesh.


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh (axis 'batch') over all devices of all processes, in process order."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places identical host values on every device of the mesh (works across processes)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                               lambda idx, x=np.asarray(x): x[idx]), tree)


def abstract_replicated(tree: Any, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of `tree` with the replicated sharding (the restore target)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def local_copy(tree: Any) -> Any:
    """Host NumPy copies of replicated arrays, read from this process's first device (works on any host)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def shard_batch(local_images: np.ndarray, mesh: Mesh) -> Array:
    """This process's [B / process_count, ...] slice -> the global [B, ...] array split over AXIS."""
    global_shape = (local_images.shape[0] * jax.process_count(), *local_images.shape[1:])
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local_images, global_shape)


class StepConfig(NamedTuple):
    """The static (hashable) part of the train step: equal configs share one compiled program."""

    model: UNet
    lr: float
    warmup_steps: int
    grad_clip: float
    ema_decay: float
    loss_type: str
    variance: str
    mean_type: str
    ordered_allreduce: bool


def step_config(config: ml_collections.ConfigDict) -> StepConfig:
    t, d = config.training, config.diffusion
    return StepConfig(from_config.build_model(config), t.lr, t.warmup_steps, t.grad_clip, t.ema_decay, d.loss_type,
                      d.variance, d.mean_type, t.ordered_allreduce)


@functools.partial(jax.jit, static_argnames=("hyper", "mesh"), donate_argnums=(0,))
def parallel_train_step(state: TrainState, images: Array, rng: Array, schedule: schedules.Schedule, *,
                        hyper: StepConfig, mesh: Mesh) -> tuple[TrainState, dict[str, Array]]:
    """`train_step` on every device of `mesh`: images [B, H, W, C] split over AXIS, the rest replicated.

    The state is donated: its buffers are reused for the new state.
    """
    step = functools.partial(
        train_step, model=hyper.model, optimizer=make_optimizer(hyper.lr, hyper.warmup_steps, hyper.grad_clip),
        lr_fn=learning_rate_fn(hyper.lr, hyper.warmup_steps), ema_decay=hyper.ema_decay,
        loss_type=hyper.loss_type, variance=hyper.variance, mean_type=hyper.mean_type,
        ordered_allreduce=hyper.ordered_allreduce)
    per_device = lambda st, x, key, sched: step(st, x, key, schedule=sched)
    with jax.threefry_partitionable(False):  # see THREEFRY_NOTE
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(), P()),
                             out_specs=(P(), P()))(state, images, rng, schedule)


# --------------------------------------------------------------------------
# The impure loop: data, checkpoints, logging, sample grids, signals.


def _check_finite(metrics: dict[str, Array], step: int, limit: int, manager) -> None:
    consecutive = int(local_copy(metrics["consecutive_nonfinite"]))
    if consecutive >= limit:
        raise FloatingPointError(
            f"training stopped at step {step}: the loss or the gradient norm was not finite for {consecutive} "
            f"consecutive steps (training.max_consecutive_nonfinite = {limit}); those updates were skipped, so the "
            f"parameters are the last finite ones, and {_newest_checkpoint(manager)}. Check the data for NaN/inf, "
            "lower training.lr, or train without training.bf16.")


def _newest_checkpoint(manager) -> str:
    latest = manager.latest_step()
    return "no checkpoint has been saved yet" if latest is None else f"the newest checkpoint (step {latest}) is kept"


def _log(writer: MetricWriter, bar: tqdm, step: int, pending: list[dict], images_per_step: int,
         seconds: float) -> None:
    rows = local_copy(pending)
    counters = ("skipped", "nonfinite_count", "consecutive_nonfinite")
    scalars = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in counters}
    # Counters: skipped in this interval, and the running totals at its last step.
    scalars.update(skipped=float(sum(r["skipped"] for r in rows)), nonfinite_count=float(rows[-1]["nonfinite_count"]),
                   consecutive_nonfinite=float(rows[-1]["consecutive_nonfinite"]),
                   steps_per_sec=len(rows) / seconds, images_per_sec=len(rows) * images_per_step / seconds)
    writer.write_scalars(step, scalars)
    bar.set_postfix(loss=f"{scalars['loss']:.4f}", steps_s=f"{scalars['steps_per_sec']:.2f}",
                    img_s=f"{scalars['images_per_sec']:.0f}", refresh=False)


def generate_samples(config: ml_collections.ConfigDict, params: Any, rng: Array, *, progress: bool = False) -> Array:
    """sampling.batch samples x_0 [B, H, W, C] from `params` (the EMA weights) with the config's sampling group."""
    s = config.sampling
    variance = None if s.eta is not None else s.variance  # DDIM's η sets σ itself
    return sampling.sample(from_config.model_fn(config, params, variance), from_config.build_schedule(config), rng,
                           (s.batch, *from_config.image_shape(config)), num_steps=s.num_steps,
                           variance=variance, mean_type=config.diffusion.mean_type, eta=s.eta, clip_x0=s.clip_x0,
                           progress=progress)


def _sample_grid(config, state: TrainState, rng: Array, step: int, workdir: str, writer: MetricWriter) -> None:
    """An EMA-parameter sample grid (process 0), workdir/samples/step_<step>.png."""
    # This process's copy of the replicated EMA weights, as host arrays the sampler can place.
    params = local_copy(state.ema_params)
    images = np.asarray(generate_samples(config, params, rng))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    grid = image_grid.save_grid(path, images, scale=max(1, 64 // images.shape[1]))
    writer.write_image(step, "samples", grid)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
                       fresh_start_if_damaged: bool = False) -> TrainState:
    """Trains until training.num_train_steps, resuming from the newest intact checkpoint in workdir.

    On SIGTERM/SIGINT, from its first line on, it saves the current step (when new) and returns normally.
    Raises FloatingPointError after training.max_consecutive_nonfinite skipped updates in a row;
    resume.ResumeRefused when another run holds the workdir, or when a checkpoint would be resumed
    with a config whose experiment fields changed (unless allow_config_change);
    checkpoints.AllCheckpointsDamaged when no checkpoint restores (unless fresh_start_if_damaged:
    they are then moved to workdir/damaged_checkpoints and training starts at step 0).
    """
    with StopRequest() as stop:  # first, so that a signal during start-up takes the clean path too
        config_validation.validate_config(config)
        with resume.workdir_lock(workdir):
            return _train(config, workdir, stop, allow_config_change, fresh_start_if_damaged)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: StopRequest, allow_config_change: bool,
           fresh_start_if_damaged: bool) -> TrainState:
    t = config.training
    mesh = make_mesh()
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.PRNGKey(t.seed), 3)
    train_rng = replicate(train_rng, mesh)
    abstract = abstract_replicated(jax.eval_shape(functools.partial(create_train_state, config), init_rng), mesh)
    # Synchronous saves (the default) are committed before the next step: a crash recomputes <= save_every steps.
    manager = checkpoints.make_manager(workdir, max_to_keep=t.keep_checkpoints, asynchronous=t.async_checkpointing)
    writer = bar = None
    try:
        if manager.all_steps():
            for change in resume.check_config_change(workdir, config, allow=allow_config_change):
                logging.warning("Resuming with a changed config (allowed): %s", change)
        restored = checkpoints.restore_latest(manager, without_ema(abstract), abstract.ema_params,
                                              fresh_start_if_damaged=fresh_start_if_damaged)
        if restored is None:
            state = replicate(jax.device_get(create_train_state(config, init_rng)), mesh)
        else:
            state = TrainState(ema_params=restored.ema_params, **restored.state)
            logging.info("Resumed from step %d of %s", restored.step, workdir)
        start = int(local_copy(state.step))
        checkpoints.write_config(workdir, config)
        meta = checkpoints.run_metadata(config)
        schedule = replicate(from_config.build_schedule(config), mesh)
        step_fn = _compiled_step(config, mesh, state, train_rng, schedule)
        batches = data.get_dataset(
            config.data.dataset, "train", batch_size=t.batch_size // jax.process_count(), seed=t.seed,
            shard_index=jax.process_index(), shard_count=jax.process_count(), image_size=config.data.image_size,
            random_flip=config.data.random_flip, data_dir=config.data.data_dir, start_step=start,
            worker_count=config.data.worker_count)
        drop_metrics_after(workdir, start)  # rows of steps this run recomputes
        writer = MetricWriter(workdir)
        bar = tqdm(total=t.num_train_steps, initial=start, unit="step", disable=jax.process_index() != 0)
        pending, previous, step = [], None, start
        tick = time.perf_counter()
        while step < t.num_train_steps:
            if stop.requested():
                logging.warning("Signal %s: saving step %d and stopping.", stop.signum, step)
                _save(manager, state, step, meta)
                break
            images = shard_batch(next(batches)["image"], mesh)
            state, metrics = step_fn(state, images, train_rng, schedule)
            step += 1
            bar.update(1)
            if previous is not None:  # one step behind, so the host never waits on the running step
                _check_finite(previous, step - 1, t.max_consecutive_nonfinite, manager)
            previous = metrics
            pending.append(metrics)
            last = step == t.num_train_steps
            if step % t.log_every == 0 or last:
                _log(writer, bar, step, pending, t.batch_size, time.perf_counter() - tick)
                pending, tick = [], time.perf_counter()
                _check_finite(metrics, step, t.max_consecutive_nonfinite, manager)
            if step % t.save_every == 0 or last:
                _check_finite(metrics, step, t.max_consecutive_nonfinite, manager)
                _save(manager, state, step, meta)
            if t.sample_every and step % t.sample_every == 0 and jax.process_index() == 0:
                _sample_grid(config, state, sample_rng, step, workdir, writer)
    finally:
        manager.wait_until_finished()
        manager.close()
        for closable in (writer, bar):
            if closable is not None:
                closable.close()
    return state


def _compiled_step(config: ml_collections.ConfigDict, mesh: Mesh, state: TrainState, rng: Array,
                   schedule: schedules.Schedule) -> Callable:
    """parallel_train_step with this config's static arguments.

    With several processes it is compiled ahead and the processes meet before the
    first step: one that loads the program from a persistent cache would otherwise
    wait in the first all-reduce while another compiles, past the collectives' timeout.
    """
    step_fn = functools.partial(parallel_train_step, hyper=step_config(config), mesh=mesh)
    if jax.process_count() == 1:
        return step_fn
    images = jax.ShapeDtypeStruct((config.training.batch_size, *from_config.image_shape(config)), jnp.float32,
                                  sharding=NamedSharding(mesh, P(AXIS)))
    compiled = parallel_train_step.lower(state, images, rng, schedule, hyper=step_config(config), mesh=mesh).compile()
    multihost_utils.sync_global_devices("ddpm_jax_train_step_compiled")
    return compiled


def _save(manager, state: TrainState, step: int, meta: dict) -> None:
    # A stop before the first step, or right after a resume or a save, has nothing new to write.
    if step > 0 and manager.latest_step() != step:
        checkpoints.save(manager, step, without_ema(state), state.ema_params, meta)


def without_ema(state: TrainState) -> dict[str, Any]:
    """The checkpoint's 'state' item: every field but ema_params (saved as its own item)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "ema_params"}
