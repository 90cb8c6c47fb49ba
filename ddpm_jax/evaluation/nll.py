"""The variational bound over a data split, and Analytic-DPM's Γ_t.

`nll_bpd`: Ho et al. 2020 eq. 5 (L_T + Σ L_{t−1} + L_0, discretized decoder
eq. 13) in bits/dim, averaged over a data split, on the full chain or on a
K-step respaced sub-chain (Nichol & Dhariwal 2021 §4), with its standard error.

`estimate_gamma`: Bao et al. 2022 (Analytic-DPM) Thm. 1 needs
Γ_t = E_{q(x_0) q(ε)} ||ε_θ(x_t, t)||²/d; it is estimated by Monte Carlo over
training data (their §3). Γ_t depends only on the marginal q(x_t), so
one estimate on the full chain serves every sub-chain through the step
indices `schedule.timesteps`. Γ is therefore always an array over the FULL
T-step chain ([T], like the sampler's `gamma`); steps that were not estimated
hold NaN, so using them fails loudly instead of silently.

Both functions expect the full T-step chain the model was trained on and
model_fn(x_t, t) -> [B, ..., C] (or 2C channels for a learned variance: the
first C are the mean output). Data are [N, H, W, C] (or [N, D]) float32 in
[−1, 1]; for the bound they must lie on the 8-bit grid k/127.5 − 1, which the
discretized decoder assumes (digits' 17 levels are scaled onto it by data.py).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ddpm_jax import diffusion, losses, schedules
from ddpm_jax.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


# --------------------------------------------------------------------------
# Validation at the boundary.


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_full_chain(schedule: Schedule) -> None:
    timesteps = np.asarray(schedule.timesteps)
    if not np.array_equal(timesteps, np.arange(schedule.num_timesteps)):
        raise ValueError(
            "schedule must be the full T-step chain the model was trained on (timesteps 0..T-1); "
            "pass num_steps/steps to evaluate a sub-chain instead of a respaced schedule"
        )


def _check_data(data: np.ndarray) -> np.ndarray:
    try:
        data = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"data must be a float array [N, H, W, C] or [N, D] in [-1, 1], got {type(data).__name__}") from None
    if data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(f"data must have shape [N, H, W, C] or [N, D] with N >= 1, got {data.shape}")
    if not np.all(np.isfinite(data)) or data.min() < -1.0 or data.max() > 1.0:
        raise ValueError("data must be finite and lie in [-1, 1]")
    return data


def on_8bit_grid(data: np.ndarray, atol: float = 1e-4) -> bool:
    """True when every value is k/127.5 − 1 for an integer k in 0..255 (Ho et al. §3.3 scaling)."""
    levels = (np.asarray(data, dtype=np.float64) + 1.0) * 127.5
    return bool(np.all(np.abs(levels - np.round(levels)) <= atol * 127.5))


def _mean_output(model_fn: ModelFn, x_t: Array, t: Array) -> Array:
    return model_fn(x_t, t)[..., : x_t.shape[-1]]


def as_partial(model_fn: ModelFn) -> Partial:
    """model_fn as a pytree: the weights bound in a `Partial(apply, params)` are traced by jit, not baked in."""
    return model_fn if isinstance(model_fn, Partial) else Partial(model_fn)


def mean_output_fn(model_fn: ModelFn) -> Partial:
    """The first C channels of the output: ε (or x_0, v) without a learned variance's extra C channels."""
    return Partial(_mean_output, as_partial(model_fn))


def kept_steps(num_timesteps: int, num_steps: int | None, spacing: str = "even") -> np.ndarray:
    """The steps a K-step sub-chain keeps, as `sampling.sample` picks them: all T when K is None or T."""
    if num_steps is None or num_steps == num_timesteps:
        return np.arange(num_timesteps)
    return schedules.space_timesteps(num_timesteps, num_steps, spacing)


# --------------------------------------------------------------------------
# Statistics and batching.


def standard_error(values: np.ndarray) -> float:
    """s/√n with the unbiased sample standard deviation s (ddof = 1); NaN for n < 2."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(values.size))


def _padded_batches(data: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch [batch_size, ...], number of real rows): the last batch is padded with
    copies of row 0 so every batch has one static shape and compiles once."""
    for start in range(0, data.shape[0], batch_size):
        batch = data[start : start + batch_size]
        count = batch.shape[0]
        if count < batch_size:
            pad = np.broadcast_to(data[:1], (batch_size - count,) + data.shape[1:])
            batch = np.concatenate([batch, pad], axis=0)
        yield batch, count


# --------------------------------------------------------------------------
# Γ_t (Analytic-DPM).


@functools.partial(jax.jit, static_argnames="mean_type")
def _gamma_terms(model_fn: Partial, schedule: Schedule, x0: Array, rng: Array, steps: Array, *, mean_type: str) -> Array:
    """||ε_θ(x_t, t)||²/d for each step in `steps` [S] and each example of x0 [B] -> [S, B]."""
    batch = x0.shape[0]

    def one_step(_, inputs):
        step, key = inputs
        t = jnp.full((batch,), step, dtype=jnp.int32)
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        output = model_fn(x_t, t)
        _, eps = diffusion.predict_x0_eps(schedule, x_t, t, output, mean_type)
        return None, losses.mean_flat(eps**2)

    keys = jax.random.split(rng, steps.shape[0])
    _, sq_norms = jax.lax.scan(one_step, None, (steps, keys))
    return sq_norms


def estimate_gamma(
    model_fn: ModelFn,
    schedule: Schedule,
    data: np.ndarray,
    rng: Array,
    *,
    batch_size: int = 256,
    num_batches: int | None = None,
    steps: Sequence[int] | None = None,
    mean_type: str = "eps",
) -> np.ndarray:
    """Analytic-DPM §3: Γ_t ≈ (1/M) Σ_m ||ε_θ(x_t^m, t)||²/d, x_t^m ~ q(x_t|x_0^m), float64 [T].

    schedule: the full T-step chain. data [N, ...]: training examples in [−1, 1];
    the first num_batches·batch_size are used (all when num_batches is None),
    each with a fresh ε per step. steps: the zero-based steps to estimate
    (default all T, which costs T·M network calls); the union of the kept steps
    of every sub-chain to evaluate is enough. Other entries are NaN.
    """
    _check_full_chain(schedule)
    data = _check_data(data)
    _check_positive_int("batch_size", batch_size)
    if num_batches is not None:
        _check_positive_int("num_batches", num_batches)
        data = data[: num_batches * batch_size]
    if mean_type not in diffusion.MEAN_TYPES:
        raise ValueError(f"mean_type must be one of {diffusion.MEAN_TYPES}, got {mean_type!r}")
    num_timesteps = schedule.num_timesteps
    steps = np.arange(num_timesteps) if steps is None else schedules.validate_steps(steps, num_timesteps)
    batch_size = min(batch_size, data.shape[0])

    model_fn = mean_output_fn(model_fn)
    total = np.zeros(len(steps), dtype=np.float64)
    for index, (batch, count) in enumerate(_padded_batches(data, batch_size)):
        sq_norms = _gamma_terms(model_fn, schedule, jnp.asarray(batch), jax.random.fold_in(rng, index),
                                jnp.asarray(steps, jnp.int32), mean_type=mean_type)
        total += np.asarray(sq_norms, dtype=np.float64)[:, :count].sum(axis=1)
    gamma = np.full(num_timesteps, np.nan)
    gamma[steps] = total / data.shape[0]
    return gamma


def sub_chain_gamma(gamma: np.ndarray, sub_schedule: Schedule) -> np.ndarray:
    """Γ at the steps a (respaced) chain visits: gamma[T] indexed by sub_schedule.timesteps -> [K]."""
    gamma = np.asarray(gamma, dtype=np.float64)
    timesteps = np.asarray(sub_schedule.timesteps)
    if gamma.ndim != 1 or gamma.shape[0] <= timesteps.max():
        raise ValueError(f"gamma must have shape [T] over the full chain (T > {timesteps.max()}), got {gamma.shape}")
    values = gamma[timesteps]
    if not np.all(np.isfinite(values)):
        missing = timesteps[~np.isfinite(values)][:5].tolist()
        raise ValueError(f"gamma was not estimated at steps {missing}...; pass them to estimate_gamma(steps=...)")
    return values


# --------------------------------------------------------------------------
# The bound over a split.


@functools.partial(jax.jit, static_argnames=("variances", "mean_type", "clip_x0"))
def _bound_terms(model_fn: Partial, schedule: Schedule, x0: Array, rng: Array, gamma: Array | None, *,
                 variances: tuple[str, ...], mean_type: str, clip_x0: bool) -> dict[str, dict[str, Array]]:
    # Compiled once per (model function, K, batch shape, variances, mean type, clipping).
    return losses.bpd_terms_by_variance(model_fn, schedule, x0, rng, variances=variances, mean_type=mean_type,
                                        clip_x0=clip_x0, gamma=gamma)


def nll_bpd(
    model_fn: ModelFn,
    schedule: Schedule,
    data: np.ndarray,
    rng: Array,
    *,
    variance: str,
    num_steps: int | None = None,
    spacing: str = "even",
    gamma: np.ndarray | None = None,
    batch_size: int = 128,
    mean_type: str = "eps",
    clip_x0: bool = False,
) -> dict:
    """Ho et al. eq. 5 in bits/dim per example of `data`, on the K = num_steps sub-chain (T when None).

    The sub-chain keeps the steps kept_steps(T, K, spacing) (the sampler's),
    always including t = 0, so its L_0 is the decoder on the data. gamma [T] (full
    chain, from estimate_gamma) is needed for variance='analytic'. Each example
    gets one Monte Carlo draw of x_t per step (Ho's code does the same), so the
    standard error covers both data and noise. Returns dict(mean, stderr,
    num_examples, num_steps, total [N], prior [N], terms [K] (mean per step)).
    """
    return nll_bpd_by_variance(model_fn, schedule, data, rng, variances=(variance,), num_steps=num_steps,
                               spacing=spacing, gamma=gamma, batch_size=batch_size, mean_type=mean_type,
                               clip_x0=clip_x0)[variance]


def nll_bpd_by_variance(
    model_fn: ModelFn,
    schedule: Schedule,
    data: np.ndarray,
    rng: Array,
    *,
    variances: Sequence[str],
    num_steps: int | None = None,
    spacing: str = "even",
    gamma: np.ndarray | None = None,
    batch_size: int = 128,
    mean_type: str = "eps",
    clip_x0: bool = False,
) -> dict[str, dict]:
    """`nll_bpd` for several σ choices at the cost of one: {variance: the dict nll_bpd returns}.

    One network call per step and example serves every choice, and every choice
    sees the same x_t draws, so differences between choices carry far less
    noise than their standard errors suggest. With the same rng each entry
    equals what nll_bpd returns for that variance alone.
    """
    _check_full_chain(schedule)
    data = _check_data(data)
    if not on_8bit_grid(data):
        raise ValueError("data must lie on the 8-bit grid k/127.5 - 1 (k = 0..255): the discretized decoder (Ho eq. 13) assumes it")
    _check_positive_int("batch_size", batch_size)
    if isinstance(variances, str) or not variances:
        raise ValueError(f"variances must be a non-empty sequence of names, got {variances!r}")
    variances = tuple(variances)
    for variance in variances:
        if not isinstance(variance, str) or variance not in diffusion.VARIANCES:
            raise ValueError(f"variance must be one of {sorted(diffusion.VARIANCES)}, got {variance!r}")
    if len(set(variances)) != len(variances):
        raise ValueError(f"variances must be distinct, got {variances!r}")
    analytic = "analytic" in variances
    if analytic and gamma is None:
        raise ValueError("variance='analytic' needs gamma [T] (from estimate_gamma)")
    num_timesteps = schedule.num_timesteps
    if num_steps is None:
        num_steps = num_timesteps
    _check_positive_int("num_steps", num_steps)
    sub = schedules.respace(schedule, kept_steps(num_timesteps, num_steps, spacing))
    sub_gamma = jnp.asarray(sub_chain_gamma(gamma, sub), jnp.float32) if analytic else None
    learned = any(v in diffusion.LEARNED_VARIANCES for v in variances)
    model_fn = as_partial(model_fn) if learned else mean_output_fn(model_fn)
    batch_size = min(batch_size, data.shape[0])

    parts = {v: dict(total=[], prior=[], term_sums=np.zeros(num_steps)) for v in variances}
    for index, (batch, count) in enumerate(_padded_batches(data, batch_size)):
        out = _bound_terms(model_fn, sub, jnp.asarray(batch), jax.random.fold_in(rng, index), sub_gamma,
                           variances=variances, mean_type=mean_type, clip_x0=bool(clip_x0))
        for variance, part in parts.items():
            part["total"].append(np.asarray(out[variance]["total"], np.float64)[:count])
            part["prior"].append(np.asarray(out[variance]["prior"], np.float64)[:count])
            part["term_sums"] += np.asarray(out[variance]["terms"], np.float64)[:, :count].sum(axis=1)
    results = {}
    for variance, part in parts.items():
        total = np.concatenate(part["total"])
        results[variance] = dict(mean=float(total.mean()), stderr=standard_error(total), num_examples=int(total.size),
                                 num_steps=int(num_steps), total=total, prior=np.concatenate(part["prior"]),
                                 terms=part["term_sums"] / total.size)
    return results
