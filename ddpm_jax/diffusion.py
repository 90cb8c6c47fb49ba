"""The forward process, its posterior and the reverse process p(x_{t−1}|x_t).

Pure, jit-able functions of a `Schedule`, batched over a per-example step
t (int32 [B], zero-based: t = 0 is the paper's t = 1). x has any trailing
shape ([B, H, W, C] images or [B, D] vectors). Equation numbers: Ho et al.
2020 ("Ho"), Nichol & Dhariwal 2021 ("N&D"), Bao et al. 2022 ("Analytic-DPM"),
and the seed note (docs/derivation.md, "seed").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedules import Schedule

Array = jax.Array


def extract(a: Array, t: Array, x_shape: tuple[int, ...]) -> Array:
    """a[t] for t [B], reshaped to [B, 1, ..., 1] to broadcast against x_shape."""
    out = jnp.take(a, t, axis=0)
    return out.reshape(t.shape + (1,) * (len(x_shape) - t.ndim))


def check_t(schedule: Schedule, t: Array, x: Array, name: str = "t") -> None:
    """t must be an integer array [B] (B = x.shape[0]) of steps in [0, K).

    Dtype and shape are checked always (they are static under jit too); the range
    only when t is concrete (eager mode). Under jit an out-of-range t is not
    checked here: jnp.take would clamp it silently, so the sampler and the bound,
    which build t themselves, validate their inputs once at entry instead.
    """
    t_shape, dtype = np.shape(t), (t.dtype if hasattr(t, "dtype") else np.asarray(t).dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of zero-based steps, got dtype {dtype}")
    if t_shape != tuple(np.shape(x)[:1]):
        raise ValueError(f"{name} must have shape [B] = {tuple(np.shape(x)[:1])} (one step per example), got {t_shape}")
    if not isinstance(t, jax.core.Tracer):
        values = np.asarray(t)
        K = schedule.num_timesteps
        if values.size and (values.min() < 0 or values.max() >= K):
            raise ValueError(f"{name} must lie in [0, {K - 1}] (zero-based steps of this {K}-step chain), "
                             f"got values in [{values.min()}, {values.max()}]")


# --------------------------------------------------------------------------
# Forward process q(x_t | x_0).


def q_mean_variance(schedule: Schedule, x0: Array, t: Array) -> tuple[Array, Array, Array]:
    """Ho eq. 4: q(x_t|x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I); seed: N(ᾱ_t x_0, β̄_t² I). Returns (mean, variance, log_variance)."""
    check_t(schedule, t, x0)
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
    # √(1 − ᾱ_t)² from float64, not 1 − ᾱ_t in float32, which loses β_1 ≈ 1e-4 to cancellation.
    variance = extract(schedule.sqrt_one_minus_alphas_cumprod**2, t, x0.shape)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """Ho eq. 4 / Algorithm 1: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (seed: x_t = ᾱ_t x_0 + β̄_t ε)."""
    check_t(schedule, t, x0)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_draw(schedule: Schedule, x0: Array, i: Array, key: Array) -> tuple[Array, Array, Array]:
    """One Monte Carlo draw at step i for every example: (t = i [B], ε ~ N(0, I) from key, x_t = q_sample(x0, t, ε)).

    The draw that the bound, DDIM's bound and the step statistics share, so their x_t are the same.
    """
    t = jnp.full(x0.shape[:1], i, dtype=jnp.int32)
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    return t, noise, q_sample(schedule, x0, t, noise)


# --------------------------------------------------------------------------
# Posterior q(x_{t−1} | x_t, x_0).


def q_posterior(schedule: Schedule, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """Ho eqs. 6–7 / seed eq. 5: the posterior mean μ̃_t(x_t, x_0), variance β̃_t and clipped log β̃_t.

    μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,
    β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t.  At t = 1, β̃_1 = 0 and its log is clipped to log β̃_2.
    """
    check_t(schedule, t, x_t)
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
# The reverse process. σ_t² is computed by `ddpm_jax.variances` and passed in.


def split_model_output(output: Array, learned: bool) -> tuple[Array, Array | None]:
    """A network with a learned variance outputs 2C channels on the last axis: (mean part, variance part)."""
    if learned:
        mean_out, var_out = jnp.split(output, 2, axis=-1)
        return mean_out, var_out
    return output, None


def p_mean_variance(
    schedule: Schedule,
    mean_output: Array,
    x_t: Array,
    t: Array,
    log_variance: Array,
    *,
    mean_type: str = "eps",
    clip_x0: bool = False,
) -> dict[str, Array]:
    """p_θ(x_{t−1}|x_t) = N(μ_θ(x_t, t), σ_t² I) (Ho eq. 1 & 11; seed eq. 7).

    μ_θ = μ̃_t(x_t, x̂_0) with x̂_0 from the network's mean output (optionally
    clipped to [−1, 1], then ε̂ recomputed from it); for ε-prediction without
    clipping this equals `eps_to_mean`. log_variance: log σ_t², broadcastable to
    x_t (from `variances.batch_log_variance`). Returns a dict with mean, variance,
    log_variance, pred_x0, pred_eps (each shaped like x_t).
    """
    pred_x0, pred_eps = predict_x0_eps(schedule, x_t, t, mean_output, mean_type)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = x0_to_eps(schedule, x_t, t, pred_x0)
    mean, _, _ = q_posterior(schedule, pred_x0, x_t, t)
    log_variance = jnp.broadcast_to(log_variance, x_t.shape)
    return dict(
        mean=mean,
        variance=jnp.exp(log_variance),
        log_variance=log_variance,
        pred_x0=pred_x0,
        pred_eps=pred_eps,
    )
