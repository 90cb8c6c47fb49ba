"""The reverse chain x_T → x_0 under one `lax.scan`: ancestral, respaced and DDIM.

Ancestral sampling is Ho et al. 2020, Algorithm 2, with any σ_t record of
`ddpm_jax.variances` (resolved once, on the host, into a float32 [K] array or
"from the network"); a K-step sub-chain is `schedules.respace` (Nichol &
Dhariwal 2021, §4); DDIM is Song et al. 2021, eq. 12 with σ_t(η) of eq. 16.

Randomness (the key layout is part of the contract, tests rebuild it):
  init_key, chain_key = jax.random.split(rng)
  x_T[b]       = N(0, I) drawn from fold_in(init_key, b)
  z at step i  = N(0, I) drawn from fold_in(fold_in(chain_key, i), b)
where b is the example's index in the GLOBAL batch (first_example + its row in
this call's batch: a process sampling rows [o, o + B) of a larger batch passes
first_example=o) and i the step of the (sub-)chain. Every example owns its
noise, so the samples are the same on one device or eight, in one process or
several, and ancestral and DDIM paths share the same z.

Compilation: `_run_chunk` is jitted once per static configuration (model
function, per-device shape, chunk length, the record's network function (if the
network outputs σ), mean type, DDIM or not, clip_x0, trajectory, mesh). The
schedule, the σ² arrays, the keys, the step indices and
the bound arguments of a `jax.tree_util.Partial` model are traced, so a new
schedule of the same length, a new σ_t choice or new weights reuse the program.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jax.tree_util import Partial
from tqdm.auto import tqdm

from ddpm_jax import diffusion, variances
from ddpm_jax.schedules import SPACINGS, Schedule, kept_steps, sub_chain

Array = jax.Array
AXIS = "batch"  # the one mesh axis: the batch is split over devices, nothing else is
PROGRESS_UPDATES = 20  # default number of progress-bar chunks when chunk_size is None


class _Config(NamedTuple):
    """What changes the compiled program (static); everything else is traced."""

    example_shape: tuple[int, ...]
    network: variances.NetworkFn | None  # the record's, when the network outputs σ² (2C channels)
    mean_type: str
    ddim: bool
    clip_x0: bool
    return_trajectory: bool


# --------------------------------------------------------------------------
# Noise and one reverse step.


def example_noise(key: Array, example_ids: Array, example_shape: tuple[int, ...]) -> Array:
    """N(0, I) of shape [b, *example_shape]; example j draws from fold_in(key, example_ids[j])."""
    return jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(key, b), example_shape))(example_ids)


def _not_last(i: Array) -> Array:
    # Ho Algorithm 2: z = 0 at t = 1 (our i = 0); the decoder mean is the sample.
    return (i > 0).astype(jnp.float32)


def ancestral_step(schedule: Schedule, output: Array, x_t: Array, i: Array, z: Array, log_variance: Array | None, *,
                   network: variances.NetworkFn | None, mean_type: str, clip_x0: bool) -> Array:
    """Ho Algorithm 2, line 4: x_{t−1} = μ_θ(x_t, t) + σ_t z, with z = 0 at the last step.

    For ε-prediction μ_θ = (x_t − β_t/√(1 − ᾱ_t) ε_θ)/√α_t (Ho eq. 11). i is the
    scalar step of `schedule`; x_t, z are [B, ...]; output is the model's;
    log_variance [K] is the resolved log σ² (None when `network` reads it from output).
    """
    chex.assert_equal_shape([x_t, z])
    t = jnp.full(x_t.shape[:1], i, jnp.int32)
    mean_out, var_out = diffusion.split_model_output(output, network is not None)
    log_var = variances.batch_log_variance(network, log_variance, schedule, var_out, t, x_t.shape)
    p = diffusion.p_mean_variance(schedule, mean_out, x_t, t, log_var, mean_type=mean_type, clip_x0=clip_x0)
    return p["mean"] + _not_last(i) * jnp.exp(0.5 * p["log_variance"]) * z


def ddim_step(schedule: Schedule, output: Array, x_t: Array, i: Array, z: Array, sigma2: Array, *,
              mean_type: str, clip_x0: bool) -> Array:
    """Song et al. 2021, eq. 12: x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z.

    sigma2 [K]: σ_t(η)² = η² β̃_t (eq. 16, `variances.ddim`). At the last step
    ᾱ_{t−1} = 1 and σ = 0, so the sample is x̂_0. With η = 1 on the full chain this
    is ancestral sampling with σ_t² = β̃_t.
    """
    chex.assert_equal_shape([x_t, z])
    t = jnp.full(x_t.shape[:1], i, jnp.int32)
    pred_x0, pred_eps = diffusion.predict_x0_eps(schedule, x_t, t, output, mean_type)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = diffusion.x0_to_eps(schedule, x_t, t, pred_x0)
    # 1 − ᾱ_{t−1} from the float64-derived √(1 − ᾱ), not from 1 − (ᾱ in float32).
    one_minus_ac_prev = jnp.concatenate([jnp.zeros(1), schedule.sqrt_one_minus_alphas_cumprod[:-1] ** 2])
    sigma2 = diffusion.extract(sigma2, t, x_t.shape)
    x0_coef = diffusion.extract(jnp.sqrt(schedule.alphas_cumprod_prev), t, x_t.shape)
    eps_coef = jnp.sqrt(jnp.maximum(diffusion.extract(one_minus_ac_prev, t, x_t.shape) - sigma2, 0.0))
    return x0_coef * pred_x0 + eps_coef * pred_eps + _not_last(i) * jnp.sqrt(sigma2) * z


# --------------------------------------------------------------------------
# The compiled chain.
# shard_map over a 1-D mesh rather than pmap or jit-with-shardings: it is one
# jitted program (it composes with scan and with an outer jit, which the
# benchmark uses for memory_analysis), each device runs exactly the
# single-device scan on its slice with no collective the compiler could add,
# and the global example index (for the noise) is axis_index · local batch + j.


def _check_output(output: Array, x: Array, config: _Config) -> None:
    channels = variances.model_channels(x.shape[-1], config.network is not None)
    expected = (*x.shape[:-1], channels)
    if output.shape != expected:
        raise ValueError(f"model_fn output must have shape {expected} (per-device batch; 2C channels when the "
                         f"network outputs σ²), got {output.shape}")


def _example_ids(local_batch: int, first: Array) -> Array:
    return first + jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


@functools.partial(jax.jit, static_argnames=("shape", "mesh"))
def _start(rng: Array, first: Array, *, shape: tuple[int, ...], mesh: Mesh) -> tuple[Array, Array]:
    """(x_T ~ N(0, I) [B, ...] sharded over the batch, the key of the chain's noise z)."""
    init_key, chain_key = jax.random.split(rng)
    local_batch = shape[0] // mesh.size
    per_device = lambda key, first: example_noise(key, _example_ids(local_batch, first), shape[1:])
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P()), out_specs=P(AXIS))(init_key, first), chain_key


@jax.jit
def _stack_trajectory(x_T: Array, chunks: list[Array]) -> Array:
    return jnp.concatenate([x_T[None], *chunks], axis=0)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _run_chunk(model_fn: Partial, schedule: Schedule, sigma2: Array | None, log_sigma2: Array | None,
               chain_key: Array, x: Array, step_ids: Array, first: Array, *, config: _Config,
               mesh: Mesh) -> tuple[Array, Array | None]:
    """The steps `step_ids` (descending) of the chain from x [B, ...]; one lax.scan per device.

    sigma2, log_sigma2: the resolved σ² and log σ² [K] (None when the network outputs σ²).
    Returns (x after the last step, the x after every step [len(step_ids), B, ...] or None).
    """

    def per_device(model_fn, schedule, sigma2, log_sigma2, chain_key, x, step_ids, first):
        example_ids = _example_ids(x.shape[0], first)

        def body(x_t, i):
            output = model_fn(x_t, jnp.full(x_t.shape[:1], schedule.timesteps[i], jnp.int32))
            _check_output(output, x_t, config)
            z = example_noise(jax.random.fold_in(chain_key, i), example_ids, config.example_shape)
            if config.ddim:
                x_prev = ddim_step(schedule, output, x_t, i, z, sigma2, mean_type=config.mean_type,
                                   clip_x0=config.clip_x0)
            else:
                x_prev = ancestral_step(schedule, output, x_t, i, z, log_sigma2, network=config.network,
                                        mean_type=config.mean_type, clip_x0=config.clip_x0)
            # Scan outputs only on request, so memory does not grow with K otherwise.
            return x_prev, (x_prev if config.return_trajectory else None)

        return jax.lax.scan(body, x, step_ids)

    out_specs = (P(AXIS), P(None, AXIS) if config.return_trajectory else None)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P(), P(AXIS), P(), P()),
                         out_specs=out_specs)(model_fn, schedule, sigma2, log_sigma2, chain_key, x, step_ids, first)


# --------------------------------------------------------------------------
# The public sampler: validation on the host, then the compiled chunks.


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_name(value, allowed) -> bool:
    """A str among `allowed` (a list or dict given as a name is refused, not a TypeError)."""
    return isinstance(value, str) and value in allowed


def _chain_checks(schedule, num_steps, spacing, steps, variance, eta, stats, sigma_clip_steps) -> list[tuple[bool, str]]:
    """(ok, message) of each argument that picks the chain and its σ choice, schedule first."""
    T = schedule.num_timesteps if isinstance(schedule, Schedule) else None
    return [
        (T is not None, f"schedule must be a ddpm_jax.schedules.Schedule, got {type(schedule).__name__}"),
        (_is_name(spacing, SPACINGS), f"spacing must be one of {SPACINGS}, got {spacing!r}"),
        (num_steps is None or steps is None, "give num_steps or steps, not both"),
        (num_steps is None or _is_int(num_steps) and T is not None and 1 <= num_steps <= T,
         f"num_steps must be an int in [1, {T}] (schedule.num_timesteps), got {num_steps!r}"),
        (eta is None or not isinstance(eta, bool) and isinstance(eta, (int, float, np.floating)) and 0.0 <= eta <= 1.0,
         f"eta must be None (ancestral sampling) or a float in [0, 1] (DDIM), got {eta!r}"),
        (eta is None or variance is None,
         f"eta (DDIM) sets σ_t(η) itself: leave variance unset (or pass variance=variances.ddim(eta)), "
         f"got variance={variance!r}"),
        (stats is None or isinstance(stats, Mapping) and all(isinstance(k, str) for k in stats),
         f"stats must be None or a mapping {{statistic name: array [T]}} (e.g. {{'gamma': Γ}}), got {type(stats).__name__}"),
        (_is_int(sigma_clip_steps) and sigma_clip_steps >= 0,
         f"sigma_clip_steps must be an int >= 0 (0: no clipping), got {sigma_clip_steps!r}"),
    ]


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _check_args(model_fn, schedule, rng, shape, num_steps, spacing, steps, variance, mean_type, eta,
                chunk_size, devices, sigma_clip_steps, stats, first_example=0) -> None:
    """One ValueError naming the field and what is allowed, before anything is traced."""
    schedule_check, *chain_checks = _chain_checks(schedule, num_steps, spacing, steps, variance, eta, stats,
                                                  sigma_clip_steps)
    checks = [
        (callable(model_fn), "model_fn must be a callable model_fn(x_t, t)"),
        schedule_check,
        (isinstance(rng, jax.Array) and (jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ()
                                         or rng.dtype == jnp.uint32 and rng.shape == (2,)),
         f"rng must be one PRNG key (jax.random.key(s) or jax.random.PRNGKey(s)), got {rng!r}"),
        (isinstance(shape, (tuple, list)) and len(shape) >= 2 and all(_is_int(d) and d >= 1 for d in shape),
         f"shape must be a tuple [B, ...] of at least 2 positive ints, got {shape!r}"),
        (_is_name(mean_type, diffusion.MEAN_TYPES), f"mean_type must be one of {diffusion.MEAN_TYPES}, got {mean_type!r}"),
        *chain_checks,
        (_is_int(first_example) and 0 <= first_example < 2**30
         or isinstance(first_example, jax.Array) and first_example.shape == () and first_example.dtype == jnp.int32,
         f"first_example must be an int >= 0 or an int32 scalar (the global index of row 0), got {first_example!r}"),
        (chunk_size is None or _is_int(chunk_size) and chunk_size >= 1,
         f"chunk_size must be None or an int >= 1, got {chunk_size!r}"),
        (devices is None or isinstance(devices, (list, tuple)) and len(devices) >= 1
         and len(set(devices)) == len(devices) and all(d in jax.local_devices() for d in devices),
         f"devices must be None (all local devices) or a non-empty list of distinct local devices, got {devices!r}"),
    ]
    _raise_first(checks)
    n_devices = len(jax.local_devices() if devices is None else devices)
    if shape[0] % n_devices:
        raise ValueError(f"shape[0] (the batch, {shape[0]}) must be divisible by the device count {n_devices}")


def sample(model_fn: Callable[[Array, Array], Array], schedule: Schedule, rng: Array, shape: Sequence[int], *,
           num_steps: int | None = None, spacing: str = "even", steps: Sequence[int] | None = None,
           variance: str | variances.Variance | None = None, stats: dict[str, np.ndarray] | None = None,
           decoder: str | None = None, sigma_clip_steps: int = 0, sigma_clip_pixel: float = 2.0,
           mean_type: str = "eps", eta: float | None = None, clip_x0: bool = False,
           return_trajectory: bool = False, progress: bool = False, chunk_size: int | None = None,
           devices: Sequence[jax.Device] | None = None, first_example: int = 0):
    """Samples x_0 ~ p_θ [B, ...] by the reverse chain (Ho Algorithm 2, or DDIM).

    model_fn(x_t, t) -> output: x_t [b, ...] (b = B / devices), t int32 [b], always
      the ORIGINAL chain's step `schedule.timesteps[i]`; output like x_t (2C last-axis
      channels when the σ record reads σ² from the network). Pass a stable function, or
      `jax.tree_util.Partial(apply, params)`: then the weights are traced arguments,
      not constants, and a new `params` does not recompile.
    schedule: the full T-step chain. num_steps / spacing / steps: run the K-step
      sub-chain `respace(schedule, kept_steps(T, num_steps, spacing, steps))`
      (spacing 'even' | 'quad' | 'uniform').
    variance: a `variances.Variance` record, or its name (default 'fixed_small');
      stats {name: [T]} holds the statistics it needs (e.g. {'gamma': Γ} for
      'analytic'), over the FULL chain; decoder: the decoder-step convention
      (`variances.DECODERS`; default: the record's). sigma_clip_steps/pixel:
      Analytic-DPM's clipping of σ² on the last noisy steps (0: off).
    eta: shorthand for variance=variances.ddim(eta): DDIM (Song et al. 2021, eq. 12,
      σ_t(η) of eq. 16); η = 0 is deterministic given x_T.
    clip_x0: clip x̂_0 to [−1, 1] (and recompute ε̂ from it) at every step.
    return_trajectory: also return [K + 1, B, ...]: x_T, then x after each step.
    progress / chunk_size: run the chain as scans of chunk_size steps (the carry
      passes between them; all full chunks share one compiled program) and show a
      tqdm bar per chunk. chunk_size defaults to K, or ⌈K/20⌉ with progress.
    devices: the devices the batch is split over (default: all local devices);
      the samples do not depend on how many (see the module docstring).
    first_example: the global index of row 0 (the noise is per global example), so
      processes that each sample their rows of one batch reproduce one process's samples.
    Returns x_0 [B, ...], or (x_0, trajectory) with return_trajectory.
    """
    _check_args(model_fn, schedule, rng, shape, num_steps, spacing, steps, variance, mean_type, eta,
                chunk_size, devices, sigma_clip_steps, stats, first_example)
    sub, resolved = _resolve_chain(schedule, num_steps, spacing, steps, variance, stats, decoder, sigma_clip_steps,
                                   sigma_clip_pixel, eta)
    return run_chain(model_fn, sub, rng, shape, resolved, mean_type=mean_type, clip_x0=clip_x0,
                     return_trajectory=return_trajectory, progress=progress, chunk_size=chunk_size, devices=devices,
                     first_example=first_example)


def prepare_chain(schedule: Schedule, *, num_steps: int | None = None, spacing: str = "even",
                  steps: Sequence[int] | None = None, variance: str | variances.Variance | None = None,
                  stats: dict[str, np.ndarray] | None = None, decoder: str | None = None, sigma_clip_steps: int = 0,
                  sigma_clip_pixel: float = 2.0, eta: float | None = None) -> tuple[Schedule, variances.Resolved]:
    """The host half of `sample` (same arguments): (the K-step sub-chain, the σ choice resolved on it).

    With `sub, resolved = prepare_chain(...)`, `run_chain(model_fn, sub, rng, shape, resolved, ...)` is
    `sample`; a caller that compiles the chain with resolved σ², log σ² as arguments runs every σ choice
    of one structure in one program.
    """
    _raise_first(_chain_checks(schedule, num_steps, spacing, steps, variance, eta, stats, sigma_clip_steps))
    return _resolve_chain(schedule, num_steps, spacing, steps, variance, stats, decoder, sigma_clip_steps,
                          sigma_clip_pixel, eta)


def _resolve_chain(schedule, num_steps, spacing, steps, variance, stats, decoder, sigma_clip_steps, sigma_clip_pixel,
                   eta) -> tuple[Schedule, variances.Resolved]:
    record = variances.ddim(eta) if eta is not None else variances.get("fixed_small" if variance is None else variance)
    kept = kept_steps(schedule.num_timesteps, num_steps, spacing, steps)
    resolved = variances.resolve(record, variances.chain(schedule, kept), stats, decoder=decoder,
                                 clip_steps=sigma_clip_steps, clip_pixel=sigma_clip_pixel)
    return sub_chain(schedule, kept), resolved


def run_chain(model_fn: Callable[[Array, Array], Array], schedule: Schedule, rng: Array, shape: Sequence[int],
              resolved: variances.Resolved, *, mean_type: str = "eps", clip_x0: bool = False,
              return_trajectory: bool = False, progress: bool = False, chunk_size: int | None = None,
              devices: Sequence[jax.Device] | None = None, first_example: int | Array = 0):
    """The reverse chain on `schedule` (already the K-step chain) with a resolved σ_t choice; see `sample`."""
    num_chain = schedule.num_timesteps
    if chunk_size is None:
        chunk_size = math.ceil(num_chain / PROGRESS_UPDATES) if progress else num_chain
    chunk_size = min(chunk_size, num_chain)

    shape = tuple(int(d) for d in shape)
    mesh = Mesh(np.asarray(jax.local_devices() if devices is None else list(devices)), (AXIS,))
    config = _Config(shape[1:], resolved.network, mean_type, resolved.ddim_eta is not None, bool(clip_x0),
                     bool(return_trajectory))
    model_fn = model_fn if isinstance(model_fn, Partial) else Partial(model_fn)
    sigma2, log_sigma2 = resolved.variance, resolved.log_variance

    first = jnp.asarray(first_example, jnp.int32)  # traced: every process runs the same program
    x_T, chain_key = _start(rng, first, shape=shape, mesh=mesh)
    x, trajectory = x_T, []
    with tqdm(total=num_chain, desc="sampling", unit="step", disable=not progress) as bar:
        previous = None
        for top in range(num_chain, 0, -chunk_size):
            step_ids = np.arange(top - 1, max(top - chunk_size, 0) - 1, -1, dtype=np.int32)
            x, ys = _run_chunk(model_fn, schedule, sigma2, log_sigma2, chain_key, x, step_ids, first, config=config,
                               mesh=mesh)
            trajectory.append(ys)
            if progress:
                # The next chunk is already queued behind this one when we wait for the
                # previous, so the device never idles on the host's bar update.
                if previous is not None:
                    bar.update(_wait(*previous))
                previous = (x, len(step_ids))
        if progress:
            bar.update(_wait(*previous))
    if return_trajectory:
        return x, _stack_trajectory(x_T, trajectory)
    return x


def _wait(x: Array, num_steps: int) -> int:
    x.block_until_ready()
    return num_steps
