"""The forward process, its posterior and the reverse process p(x_{t−1}|x_t).

Pure, jit-able functions of a `Schedule`, batched over a per-example step
t (int32 [B], zero-based: t = 0 is the paper's t = 1). x has any trailing
shape ([B, H, W, C] images or [B, D] vectors). Equation numbers: Ho et al.
2020 ("Ho"), Nichol & Dhariwal 2021 ("N&D"), Bao et al. 2022 ("Analytic-DPM"),
and the seed note (docs/derivation.md, "seed").
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.schedules import Schedule

Array = jax.Array


def extract(a: Array, t: Array, x_shape: tuple[int, ...]) -> Array:
    """a[t] for t [B], reshaped to [B, 1, ..., 1] to broadcast against x_shape."""
    out = jnp.take(a, t, axis=0)
    return out.reshape(t.shape + (1,) * (len(x_shape) - t.ndim))


# --------------------------------------------------------------------------
# Forward process q(x_t | x_0).


def q_mean_variance(schedule: Schedule, x0: Array, t: Array) -> tuple[Array, Array, Array]:
    """Ho eq. 4: q(x_t|x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I); seed: N(ᾱ_t x_0, β̄_t² I). Returns (mean, variance, log_variance)."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
    # √(1 − ᾱ_t)² from float64, not 1 − ᾱ_t in float32, which loses β_1 ≈ 1e-4 to cancellation.
    variance = extract(schedule.sqrt_one_minus_alphas_cumprod**2, t, x0.shape)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """Ho eq. 4 / Algorithm 1: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (seed: x_t = ᾱ_t x_0 + β̄_t ε)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


# --------------------------------------------------------------------------
# Posterior q(x_{t−1} | x_t, x_0).


def q_posterior(schedule: Schedule, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """Ho eqs. 6–7 / seed eq. 5: the posterior mean μ̃_t(x_t, x_0), variance β̃_t and clipped log β̃_t.

    μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,
    β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t.  At t = 1, β̃_1 = 0 and its log is clipped to log β̃_2.
    """
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


# --------------------------------------------------------------------------
# Parameterisations: ε, x_0 and v = √ᾱ ε − √(1 − ᾱ) x_0.


def eps_to_x0(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """Ho eq. 4 inverted / seed eq. 6: x̂_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def x0_to_eps(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """ε̂ = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t) = (x_t/√ᾱ_t − x_0)/√(1/ᾱ_t − 1)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def x0_eps_to_v(schedule: Schedule, x0: Array, t: Array, eps: Array) -> Array:
    """Salimans & Ho 2022, §4: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
    )


def v_to_x0(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """Salimans & Ho 2022: x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


def v_to_eps(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """Salimans & Ho 2022: ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
    return (
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        + extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * v
    )


def eps_to_mean(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """Ho eq. 11 / seed eq. 7: μ_θ = (x_t − β_t/√(1 − ᾱ_t) ε_θ)/√α_t.

    Equal to the posterior mean μ̃_t(x_t, x̂_0(ε)); with seed notation
    (α² ↦ α, β² ↦ β) it reads (x_t − β_t²/β̄_t ε)/α_t.
    """
    coef = extract(schedule.betas / schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    return (x_t - coef * eps) / extract(jnp.sqrt(schedule.alphas), t, x_t.shape)


MEAN_TYPES = ("eps", "x0", "v")


def predict_x0_eps(schedule: Schedule, x_t: Array, t: Array, output: Array, mean_type: str) -> tuple[Array, Array]:
    """(x̂_0, ε̂) from the network's mean output, whichever quantity it predicts."""
    if mean_type == "eps":
        return eps_to_x0(schedule, x_t, t, output), output
    if mean_type == "x0":
        return output, x0_to_eps(schedule, x_t, t, output)
    if mean_type == "v":
        return v_to_x0(schedule, x_t, t, output), v_to_eps(schedule, x_t, t, output)
    raise ValueError(f"mean_type must be one of {MEAN_TYPES}, got {mean_type!r}")


# --------------------------------------------------------------------------
# Reverse-process variance σ_t², every choice selectable by name.
# Each function returns log σ_t² broadcast to x_t's shape.


def _fixed_large(schedule, x_t, t, var_output, gamma):
    """Ho §3.2: σ_t² = β_t. At t = 1 we use β̃_2 as in Ho's and N&D's code, for a better decoder NLL."""
    # posterior_log_variance_clipped[0] is log β̃_2 (log β_1 on a 1-step chain, which has no β̃_2).
    log_var = jnp.concatenate([schedule.posterior_log_variance_clipped[:1], schedule.log_betas[1:]])
    return extract(log_var, t, x_t.shape)


def _fixed_small(schedule, x_t, t, var_output, gamma):
    """Ho §3.2 / seed eq. 5: σ_t² = β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t (log clipped at t = 1)."""
    return extract(schedule.posterior_log_variance_clipped, t, x_t.shape)


def _learned(schedule, x_t, t, var_output, gamma):
    """The network outputs log σ_t² directly."""
    return var_output


def _learned_range(schedule, x_t, t, var_output, gamma):
    """N&D eq. 15: log σ_t² = v log β_t + (1 − v) log β̃_t, the output in [−1, 1] mapped to v ∈ [0, 1]."""
    min_log = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    max_log = extract(schedule.log_betas, t, x_t.shape)
    frac = (var_output + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def analytic_variance_bounds(schedule: Schedule) -> tuple[Array, Array]:
    """Analytic-DPM Thm. 2 with λ_t² = β̃_t and data in [−1, 1]: lower λ², upper λ² + c_t²·((b−a)/2)²,

    where c_t = √ᾱ_{t−1} − √(1 − ᾱ_{t−1} − λ_t²)·√(ᾱ_t/(1 − ᾱ_t)) is the x_0 coefficient of the mean.
    With λ_t² = β̃_t this is c_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) = posterior_mean_coef1, which we use: the
    difference form loses most digits to float32 cancellation at small t. Returns ([K], [K]).
    """
    lam2 = schedule.posterior_variance
    return lam2, lam2 + schedule.posterior_mean_coef1**2


def analytic_variance(schedule: Schedule, gamma: Array) -> Array:
    """Analytic-DPM Thm. 1 with λ_t² = β̃_t (the DDPM chain): the optimal σ_t², [K].

    σ*_t² = λ_t² + (√((1 − ᾱ_t)/α_t) − √(1 − ᾱ_{t−1} − λ_t²))² · (1 − Γ_t),
    Γ_t = E_q ||ε_θ(x_t, t)||²/d, estimated by Monte Carlo over data (see
    `ddpm_jax.evaluation.nll.estimate_gamma`). Γ is clipped to [0, 1] and σ² to the
    Thm. 2 bounds for data in [−1, 1].
    """
    lam2 = schedule.posterior_variance
    # With λ_t² = β̃_t, √(1 − ᾱ_{t−1} − λ_t²) = (1 − ᾱ_{t−1})√(α_t/(1 − ᾱ_t)), so the gap is
    # β_t/√(α_t(1 − ᾱ_t)): the same number without float32 cancellation at small t.
    gap2 = schedule.betas**2 / (schedule.alphas * schedule.sqrt_one_minus_alphas_cumprod**2)
    sigma2 = lam2 + gap2 * (1.0 - jnp.clip(gamma, 0.0, 1.0))
    lower, upper = analytic_variance_bounds(schedule)
    return jnp.clip(sigma2, lower, upper)


def _analytic(schedule, x_t, t, var_output, gamma):
    """Analytic-DPM: log of the optimal σ_t² (log clipped at t = 1 like fixed-small, where λ_1² = 0)."""
    sigma2 = analytic_variance(schedule, gamma)
    floor = jnp.exp(schedule.posterior_log_variance_clipped[:1])
    sigma2 = sigma2.at[0].set(jnp.maximum(sigma2[0], floor[0]))
    return extract(jnp.log(sigma2), t, x_t.shape)


VARIANCES: dict[str, Callable] = {
    "fixed_large": _fixed_large,
    "fixed_small": _fixed_small,
    "learned": _learned,
    "learned_range": _learned_range,
    "analytic": _analytic,
}
LEARNED_VARIANCES = ("learned", "learned_range")


def validate_variance(variance: str, gamma: Array | None = None) -> None:
    if not isinstance(variance, str) or variance not in VARIANCES:
        raise ValueError(f"variance must be one of {sorted(VARIANCES)}, got {variance!r}")
    if variance == "analytic" and gamma is None:
        raise ValueError("variance='analytic' needs gamma (Γ_t = E||ε_θ||²/d per step, from estimate_gamma)")


def split_model_output(output: Array, variance: str) -> tuple[Array, Array | None]:
    """A learned-variance network outputs 2C channels on the last axis: (mean part, variance part)."""
    if variance in LEARNED_VARIANCES:
        mean_out, var_out = jnp.split(output, 2, axis=-1)
        return mean_out, var_out
    return output, None


def p_mean_variance(
    schedule: Schedule,
    model_output: Array,
    x_t: Array,
    t: Array,
    *,
    variance: str = "fixed_small",
    mean_type: str = "eps",
    clip_x0: bool = False,
    gamma: Array | None = None,
) -> dict[str, Array]:
    """p_θ(x_{t−1}|x_t) = N(μ_θ(x_t, t), σ_t² I) (Ho eq. 1 & 11; seed eq. 7).

    μ_θ = μ̃_t(x_t, x̂_0) with x̂_0 from the network (optionally clipped to [−1, 1]);
    for ε-prediction without clipping this equals `eps_to_mean`. `gamma` [K]
    is needed only for variance='analytic'. Returns a dict with mean,
    variance, log_variance, pred_x0, pred_eps (each shaped like x_t).
    """
    validate_variance(variance, gamma)
    mean_out, var_out = split_model_output(model_output, variance)
    pred_x0, pred_eps = predict_x0_eps(schedule, x_t, t, mean_out, mean_type)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = x0_to_eps(schedule, x_t, t, pred_x0)
    mean, _, _ = q_posterior(schedule, pred_x0, x_t, t)
    log_variance = VARIANCES[variance](schedule, x_t, t, var_out, gamma)
    log_variance = jnp.broadcast_to(log_variance, x_t.shape)
    return dict(
        mean=mean,
        variance=jnp.exp(log_variance),
        log_variance=log_variance,
        pred_x0=pred_x0,
        pred_eps=pred_eps,
    )
