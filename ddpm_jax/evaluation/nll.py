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
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ddpm_jax import ddim_bound, diffusion, losses, schedules, statistics
from ddpm_jax import variances as variances_lib
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


def as_partial(model_fn: ModelFn) -> Partial:
    """model_fn as a pytree: the weights bound in a `Partial(apply, params)` are traced by jit, not baked in."""
    return model_fn if isinstance(model_fn, Partial) else Partial(model_fn)


# --------------------------------------------------------------------------
# Statistics and batching.


def standard_error(values: np.ndarray) -> float:
    """s/√n with the unbiased sample standard deviation s (ddof = 1); NaN for n < 2."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(values.size))


# --------------------------------------------------------------------------
# Γ_t (Analytic-DPM).


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
    if num_batches is not None:  # the checks of estimate_stats first, so the bad argument is named as before
        _check_full_chain(schedule)
        data = _check_data(data)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_batches", num_batches)
        data = data[: num_batches * batch_size]
    return estimate_stats((statistics.GAMMA,), model_fn, schedule, data, rng, steps=steps, batch_size=batch_size,
                          mean_type=mean_type)["gamma"]


def estimate_stats(needs: Sequence[statistics.Statistic], model_fn: ModelFn, schedule: Schedule, data: np.ndarray,
                   rng: Array, *, steps: Sequence[int] | None = None, batch_size: int = 256,
                   mean_type: str = "eps") -> dict[str, np.ndarray]:
    """{name: float64 [T]} for each distinct statistic in `needs`, each estimated once with `rng`, after one
    ValueError check of every argument (the full chain, data in [−1, 1], batch size, steps, mean type)."""
    _check_full_chain(schedule)
    data = _check_data(data)
    _check_positive_int("batch_size", batch_size)
    if mean_type not in diffusion.MEAN_TYPES:
        raise ValueError(f"mean_type must be one of {diffusion.MEAN_TYPES}, got {mean_type!r}")
    if steps is not None:
        steps = schedules.validate_steps(steps, schedule.num_timesteps)
    return {stat.name: stat.estimate(model_fn, schedule, data, rng, steps=steps, batch_size=batch_size,
                                     mean_type=mean_type) for stat in dict.fromkeys(needs)}


# --------------------------------------------------------------------------
# The bound over a split.


@functools.partial(jax.jit, static_argnames=("networks", "mean_type", "clip_x0", "cdf"))
def _bound_terms(model_fn: Partial, schedule: Schedule, x0: Array, rng: Array, log_variances: tuple, *,
                 networks: tuple, mean_type: str, clip_x0: bool, cdf: str) -> list[dict[str, Array]]:
    # Compiled once per (model function, K, batch shape, networks, mean type, clipping, CDF).
    return losses.bound_terms(model_fn, schedule, x0, rng, log_variances, networks=networks, mean_type=mean_type,
                              clip_x0=clip_x0, cdf=cdf)


@functools.partial(jax.jit, static_argnames=("mean_type", "clip_x0", "cdf"))
def _ddim_bound_terms(model_fn: Partial, schedule: Schedule, x0: Array, rng: Array, log_sigma2s: tuple, *,
                      mean_type: str, clip_x0: bool, cdf: str) -> list[dict[str, Array]]:
    return ddim_bound.ddim_bound_terms(model_fn, schedule, x0, rng, log_sigma2s, mean_type=mean_type, clip_x0=clip_x0,
                                       cdf=cdf)


def nll_bpd(model_fn: ModelFn, schedule: Schedule, data: np.ndarray, rng: Array, *,
            variance: str | variances_lib.Variance, **kwargs) -> dict:
    """Ho et al. eq. 5 in bits/dim per example of `data`, for one σ choice; see `nll_bpd_by_variance`."""
    record = variances_lib.get(variance)
    return nll_bpd_by_variance(model_fn, schedule, data, rng, variances=(record,), **kwargs)[record.name]


def nll_bpd_by_variance(
    model_fn: ModelFn,
    schedule: Schedule,
    data: np.ndarray,
    rng: Array,
    *,
    variances: Sequence[str | variances_lib.Variance],
    num_steps: int | None = None,
    spacing: str = "even",
    steps: Sequence[int] | None = None,
    stats: Mapping[str, np.ndarray] | None = None,
    decoder: str | None = None,
    batch_size: int = 128,
    mean_type: str = "eps",
    clip_x0: bool = False,
    batch_offset: int = 0,
    cdf: str = "exact",
) -> dict[str, dict]:
    """Ho et al. eq. 5 in bits/dim per example of `data` for several σ choices at the cost of one:
    {record name: dict(mean, stderr, num_examples, num_steps, total [N], prior [N], terms [K] (mean per step))}.

    schedule: the full T-step chain; the bound runs on the sub-chain kept_steps(T, num_steps,
    spacing, steps) (the sampler's), which always keeps t = 0, so its L_0 is the decoder on the
    data. stats {name: [T]} holds what the records need (e.g. Γ for 'analytic'); decoder: the
    decoder-step convention for every record (default: each record's own); cdf: the decoder's normal
    CDF ('exact', or 'tanh' as Ho's and improved-diffusion's code). One network call per
    step and example serves every choice, and every choice sees the same x_t draws, so
    differences between choices carry far less noise than their standard errors suggest. Each
    example gets one Monte Carlo draw of x_t per step (as Ho's code), so the standard error
    covers both data and noise. batch_offset: the index of data's first batch in a larger split
    (batch b draws from fold_in(rng, b)), so a split evaluated in parts gives the same per-example totals.
    """
    _check_full_chain(schedule)
    data = _check_data(data)
    if not on_8bit_grid(data):
        raise ValueError("data must lie on the 8-bit grid k/127.5 - 1 (k = 0..255): the discretized decoder (Ho eq. 13) assumes it")
    _check_positive_int("batch_size", batch_size)
    if isinstance(variances, (str, variances_lib.Variance)) or not variances:
        raise ValueError(f"variances must be a non-empty sequence of σ records or names, got {variances!r}")
    records = [variances_lib.get(v) for v in variances]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"variances must be distinct, got {names}")
    if num_steps is not None:
        _check_positive_int("num_steps", num_steps)
    losses.check_cdf(cdf)
    kept = schedules.kept_steps(schedule.num_timesteps, num_steps, spacing, steps)
    sub = schedules.sub_chain(schedule, kept)
    chain = variances_lib.chain(schedule, kept)
    for record in records:
        losses.check_has_bound(record, ddim_allowed=True)
    resolved = [variances_lib.resolve(r, chain, stats, decoder=decoder, for_bound=True) for r in records]
    model_fn = as_partial(model_fn)
    losses.check_bound_inputs(model_fn, sub, jnp.asarray(data[:1]), resolved)
    # Ancestral records: losses.bound_terms; DDIM records: ddim_bound (q_σ). Both draw x_t from the same keys,
    # so every record sees the same x_t and the per-image differences between any two are paired.
    ancestral = [r for r in resolved if r.ddim_eta is None]
    ddim = [r for r in resolved if r.ddim_eta is not None]
    log_variances = tuple(None if r.log_variance is None else jnp.asarray(r.log_variance) for r in ancestral)
    networks = tuple(r.network for r in ancestral)
    ddim_log_variances = tuple(jnp.asarray(r.log_variance) for r in ddim)
    order = [resolved.index(r) for r in ancestral + ddim]
    batch_size = min(batch_size, data.shape[0])

    parts = [dict(total=[], prior=[], term_sums=np.zeros(len(kept))) for _ in records]
    for index, (batch, count) in enumerate(statistics.padded_batches(data, batch_size)):
        key = jax.random.fold_in(rng, batch_offset + index)
        out = []
        if ancestral:
            out += _bound_terms(model_fn, sub, jnp.asarray(batch), key, log_variances, networks=networks,
                                mean_type=mean_type, clip_x0=bool(clip_x0), cdf=cdf)
        if ddim:
            out += _ddim_bound_terms(model_fn, sub, jnp.asarray(batch), key, ddim_log_variances,
                                     mean_type=mean_type, clip_x0=bool(clip_x0), cdf=cdf)
        for part, terms in zip([parts[i] for i in order], out):
            part["total"].append(np.asarray(terms["total"], np.float64)[:count])
            part["prior"].append(np.asarray(terms["prior"], np.float64)[:count])
            part["term_sums"] += np.asarray(terms["terms"], np.float64)[:, :count].sum(axis=1)
    results = {}
    for record, part in zip(records, parts):
        total = np.concatenate(part["total"])
        results[record.name] = dict(mean=float(total.mean()), stderr=standard_error(total),
                                    num_examples=int(total.size), num_steps=len(kept), total=total,
                                    prior=np.concatenate(part["prior"]), terms=part["term_sums"] / total.size)
    return results
