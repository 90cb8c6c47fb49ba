"""Data statistics that a σ_t choice needs, estimated by Monte Carlo over training images.

A `Statistic` is a record: its name (the key in the `stats` mapping that the
sampler, the bound and the ablation pass around) and its estimator. Every
statistic is an array over the FULL T-step chain, float64 [T]; steps that were
not estimated hold NaN, so reading them fails loudly (`at_steps`).

Built in: Γ_t = E_{q(x_0) q(ε)} ||ε_θ(x_t, t)||²/d (Bao et al. 2022, Analytic-DPM,
Thm. 1 and §3). It depends only on the marginal q(x_t), so one estimate on the
full chain serves every sub-chain through the step indices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ddpm_jax import diffusion, schedules
from ddpm_jax.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
# estimate(model_fn, schedule, data, rng, *, steps, batch_size, mean_type) -> float64 [T]
Estimator = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Statistic:
    """A per-step statistic of a trained model over data: `name` keys it in `stats`; `estimate` computes it."""

    name: str
    estimate: Estimator
    doc: str = ""


def padded_batches(data: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch [batch_size, ...], number of real rows): the last batch is padded with
    copies of row 0 so every batch has one static shape and compiles once."""
    for start in range(0, data.shape[0], batch_size):
        batch = data[start : start + batch_size]
        count = batch.shape[0]
        if count < batch_size:
            pad = np.broadcast_to(data[:1], (batch_size - count,) + data.shape[1:])
            batch = np.concatenate([batch, pad], axis=0)
        yield batch, count


def mean_output_fn(model_fn: ModelFn) -> Partial:
    """The first C channels of the output: ε (or x_0, v) without a learned variance's extra C channels."""
    return Partial(_mean_output, model_fn if isinstance(model_fn, Partial) else Partial(model_fn))


def _mean_output(model_fn: ModelFn, x_t: Array, t: Array) -> Array:
    return model_fn(x_t, t)[..., : x_t.shape[-1]]


@functools.partial(jax.jit, static_argnames="mean_type")
def _step_terms(model_fn: Partial, schedule: Schedule, x0: Array, rng: Array, steps: Array, *,
                mean_type: str) -> tuple[Array, Array]:
    """(||ε_θ(x_t, t)||²/d, ||ε − ε_θ(x_t, t)||²/d) for each step in `steps` [S] and example of x0 [B] -> two [S, B]."""
    mean_flat = lambda v: jnp.mean(v, axis=tuple(range(1, v.ndim)))

    def one_step(_, inputs):
        step, key = inputs
        t, noise, x_t = diffusion.q_draw(schedule, x0, step, key)
        _, eps = diffusion.predict_x0_eps(schedule, x_t, t, model_fn(x_t, t), mean_type)
        return None, (mean_flat(eps**2), mean_flat((eps - noise) ** 2))

    keys = jax.random.split(rng, steps.shape[0])
    _, (sq_norms, sq_errors) = jax.lax.scan(one_step, None, (steps, keys))
    return sq_norms, sq_errors


def estimate_step_statistics(model_fn: ModelFn, schedule: Schedule, data: np.ndarray, rng: Array, *,
                             steps: Sequence[int] | None = None, batch_size: int = 256,
                             mean_type: str = "eps") -> dict[str, np.ndarray]:
    """{'gamma': Γ_t, 'eps_mse': M_t}, float64 [T], from one Monte Carlo pass over t (Bao et al. 2022 §3–4).

    Γ_t = E||ε_θ(x_t, t)||²/d (Thm. 1) and M_t = E||ε − ε_θ(x_t, t)||²/d (the mean term of every
    pair KL, ddpm_jax/trajectories.py), x_t^m ~ q(x_t|x_0^m) over training examples data [M, ...]
    in [−1, 1], one fresh ε per example and step, the same draws for both. schedule: the full
    T-step chain. steps: the zero-based steps to estimate (default all T, T·M network calls);
    the union of the kept steps of every sub-chain to evaluate is enough; other entries are NaN.
    Callers validate their inputs (`evaluation.nll.estimate_gamma` is the checked public entry).
    """
    num_timesteps = schedule.num_timesteps
    steps = np.arange(num_timesteps) if steps is None else schedules.validate_steps(steps, num_timesteps)
    batch_size = min(batch_size, data.shape[0])
    model_fn = mean_output_fn(model_fn)
    totals = np.zeros((2, len(steps)))
    for index, (batch, count) in enumerate(padded_batches(data, batch_size)):
        out = _step_terms(model_fn, schedule, jnp.asarray(batch), jax.random.fold_in(rng, index),
                          jnp.asarray(steps, jnp.int32), mean_type=mean_type)
        totals += np.stack([np.asarray(o, np.float64)[:, :count].sum(axis=1) for o in out])
    result = {}
    for name, total in zip(("gamma", "eps_mse"), totals):
        result[name] = np.full(num_timesteps, np.nan)
        result[name][steps] = total / data.shape[0]
    return result


def estimate_gamma(model_fn: ModelFn, schedule: Schedule, data: np.ndarray, rng: Array, **kwargs) -> np.ndarray:
    """Analytic-DPM §3: Γ_t ≈ (1/M) Σ_m ||ε_θ(x_t^m, t)||²/d, float64 [T] (`estimate_step_statistics`)."""
    return estimate_step_statistics(model_fn, schedule, data, rng, **kwargs)["gamma"]


def estimate_eps_mse(model_fn: ModelFn, schedule: Schedule, data: np.ndarray, rng: Array, **kwargs) -> np.ndarray:
    """M_t = (1/M) Σ_m ||ε − ε_θ(x_t^m, t)||²/d, float64 [T] (`estimate_step_statistics`)."""
    return estimate_step_statistics(model_fn, schedule, data, rng, **kwargs)["eps_mse"]


GAMMA = Statistic("gamma", estimate_gamma, "Γ_t = E||ε_θ(x_t, t)||²/d (Bao et al. 2022, Thm. 1)")
EPS_MSE = Statistic("eps_mse", estimate_eps_mse, "M_t = E||ε − ε_θ(x_t, t)||²/d (the mean term of every pair KL)")


def at_steps(name: str, values: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """A full-chain statistic [T] read at the steps a (sub-)chain visits -> float64 [K]; a clear error when
    it has the wrong shape or was not estimated there."""
    values = np.asarray(values, dtype=np.float64)
    timesteps = np.asarray(timesteps)
    if values.ndim != 1 or values.shape[0] <= timesteps.max():
        raise ValueError(f"stats[{name!r}] must have shape [T] over the full chain (T > {timesteps.max()}), "
                         f"got shape {values.shape}")
    picked = values[timesteps]
    if not np.all(np.isfinite(picked)):
        missing = timesteps[~np.isfinite(picked)][:5].tolist()
        raise ValueError(f"stats[{name!r}] was not estimated at steps {missing}...; estimate it at every kept step")
    return picked
