"""Closed-form oracles for Gaussian data x_0 ~ N(μ, diag s²), to test the diffusion math and samplers.

For such data every marginal is Gaussian, q(x_t) = N(√ᾱ_t μ, ᾱ_t s² + 1 − ᾱ_t),
so four things are known exactly: the optimal ε-predictor E[ε|x_t], Analytic-DPM's
Γ_t = E||E[ε|x_t]||²/d, the true reverse conditional q(x_{t−1}|x_t), and the
entropy of the data rounded onto the 8-bit grid (a lower bound on any model's
NLL). μ and s have the data's trailing shape ([H, W, C] or [D]) or are scalars.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from ddpm_jax import schedules
from ddpm_jax.diffusion import extract
from ddpm_jax.schedules import Schedule

Array = jax.Array


def gaussian_eps_oracle(schedule: Schedule, mu, s) -> Callable[[Array, Array], Array]:
    """The optimal ε-network: model_fn(x_t, t) = E[ε|x_t] = √(1 − ᾱ_t)(x_t − √ᾱ_t μ)/(ᾱ_t s² + 1 − ᾱ_t).

    `schedule` is the FULL chain the model is trained on and t [B] indexes it
    (samplers on a respaced sub-chain call the model with `sub.timesteps`).
    """
    mu = jnp.asarray(mu, jnp.float32)
    var = jnp.asarray(s, jnp.float32) ** 2

    def model_fn(x_t: Array, t: Array) -> Array:
        ac = extract(schedule.alphas_cumprod, t, x_t.shape)
        sqrt_one_minus_ac = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        sqrt_ac = extract(schedule.sqrt_alphas_cumprod, t, x_t.shape)
        return sqrt_one_minus_ac * (x_t - sqrt_ac * mu) / (ac * var + sqrt_one_minus_ac**2)

    return model_fn


def gaussian_gamma(schedule: Schedule, s) -> np.ndarray:
    """Γ_t = E||E[ε|x_t]||²/d = mean_i (1 − ᾱ_t)/(ᾱ_t s_i² + 1 − ᾱ_t), float64 [K] (Bao et al. 2022 Thm. 1).

    Γ depends only on the marginal q(x_t), so for a sub-chain this equals the
    full chain's Γ at `sub.timesteps`. s must have the data's full trailing shape
    (or be a scalar for isotropic data), since Γ averages over dimensions.
    """
    ac, one_minus_ac = (x[:, None] for x in _alphas_cumprod(schedule)[::2])
    var = np.ravel(np.asarray(s, np.float64))[None, :] ** 2
    return np.mean(one_minus_ac / (ac * var + one_minus_ac), axis=1)


def _alphas_cumprod(schedule: Schedule) -> tuple[np.ndarray, ...]:
    """(ᾱ_t, ᾱ_{t−1}, 1 − ᾱ_t, 1 − ᾱ_{t−1}) in float64, 1 − ᾱ from the stored √(1 − ᾱ) (no cancellation)."""
    ac = np.asarray(schedule.alphas_cumprod, np.float64)
    one_minus_ac = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64) ** 2
    return ac, np.append(1.0, ac[:-1]), one_minus_ac, np.append(0.0, one_minus_ac[:-1])


def gaussian_reverse_moments(schedule: Schedule, mu, s, x_t, t) -> tuple[np.ndarray, np.ndarray]:
    """The exact E[x_{t−1}|x_t] and Var[x_{t−1}|x_t] (float64 NumPy, shaped like x_t) on the chain `schedule`.

    (x_{t−1}, x_t) is jointly Gaussian with Cov(x_{t−1}, x_t) = √α_t Var(x_{t−1}), so
    E[x_{t−1}|x_t] = √ᾱ_{t−1} μ + √α_t V_{t−1}/V_t (x_t − √ᾱ_t μ) and
    Var = V_{t−1} − α_t V_{t−1}²/V_t = β_t V_{t−1}/V_t (as V_t = α_t V_{t−1} + β_t),
    with V_t = ᾱ_t s² + 1 − ᾱ_t. At t = 0 (the paper's t = 1), x_{t−1} is the data x_0.
    """
    x_t = np.asarray(x_t, np.float64)
    t = np.asarray(t)
    shape = t.shape + (1,) * (x_t.ndim - t.ndim)
    ac, ac_prev, one_minus_ac, one_minus_ac_prev = (x[t].reshape(shape) for x in _alphas_cumprod(schedule))
    alpha, beta = (np.asarray(x, np.float64)[t].reshape(shape) for x in (schedule.alphas, schedule.betas))
    mu = np.asarray(mu, np.float64)
    var = np.asarray(s, np.float64) ** 2
    v_prev = ac_prev * var + one_minus_ac_prev
    v_t = ac * var + one_minus_ac
    mean = np.sqrt(ac_prev) * mu + np.sqrt(alpha) * v_prev / v_t * (x_t - np.sqrt(ac) * mu)
    variance = beta * v_prev / v_t
    return mean, np.broadcast_to(variance, mean.shape)


def gaussian_grid_data(rng: np.random.Generator, mu, s, num: int) -> np.ndarray:
    """num samples of N(μ, diag s²) rounded onto the 8-bit grid k/127.5 − 1, float32 [num, *shape]."""
    mu, s = np.broadcast_arrays(np.asarray(mu, np.float64), np.asarray(s, np.float64))
    z = mu + s * rng.standard_normal((num,) + s.shape)
    levels = np.clip(np.round((z + 1.0) * 127.5), 0, 255)
    return (levels / 127.5 - 1.0).astype(np.float32)


def gaussian_grid_nll_bpd(x, mu, s) -> np.ndarray:
    """−log₂ P(x)/d under the true law of `gaussian_grid_data`, per example: float64 [N] for x [N, *shape]."""
    x = np.asarray(x, np.float64)
    mu, s = (np.broadcast_to(np.asarray(v, np.float64), x.shape[1:]) for v in (mu, s))
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)  # the bin of level k is [k − ½, k + ½]/127.5 − 1
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    p = special.ndtr((upper - mu) / s) - special.ndtr((lower - mu) / s)
    return -np.mean(np.log2(p).reshape(len(x), -1), axis=1)


def gaussian_nll_bpd(mu, s) -> float:
    """Entropy of `gaussian_grid_data` in bits/dim: the smallest expected NLL any model can reach.

    Bin k holds z with round((z + 1)·127.5) = k; the two edge bins extend to ∓∞.
    (Far-tail bins lose relative precision here, but p·log p of them is < 1e-15.)
    """
    mu, s = np.broadcast_arrays(np.asarray(mu, np.float64), np.asarray(s, np.float64))
    edges = np.concatenate([[-np.inf], (np.arange(1, 256) - 0.5) / 127.5 - 1.0, [np.inf]])
    p = np.diff(special.ndtr((edges[None, :] - mu.reshape(-1, 1)) / s.reshape(-1, 1)), axis=1)
    entropy_nats = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)
    return float(np.mean(entropy_nats) / np.log(2.0))


def short_chain_problem(num: int, dim: int = 8, num_timesteps: int = 10):
    """A short chain with large β's (0.01 … 0.5) and gridded Gaussian data N(μ, diag s²) of `dim` dimensions:
    (schedule, μ, s, data [num, dim]) from seed 0, small enough for brute force over trajectories."""
    schedule = schedules.get_schedule("linear", num_timesteps, beta_start=0.01, beta_end=0.5)
    rng = np.random.default_rng(0)
    mu = rng.uniform(-0.3, 0.3, dim)
    s = rng.uniform(0.2, 0.5, dim)
    return schedule, mu, s, gaussian_grid_data(rng, mu, s, num)
