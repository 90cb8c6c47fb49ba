"""The variational bound of DDIM with 0 < η ≤ 1 (Song et al. 2021, eqs. 7–8, 12, 16).

DDIM's inference process q_σ keeps the marginals q(x_t|x_0) of DDPM but uses the
non-Markovian posterior (eq. 7)

  q_σ(x_{t−1}|x_t, x_0) = N(√ᾱ_{t−1} x_0 + √(1 − ᾱ_{t−1} − σ_t²) (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t), σ_t² I),

and its generative step p_θ(x_{t−1}|x_t) is the same Gaussian with x̂_0 = f_θ(x_t) in place
of x_0 (eq. 12; the ε-term becomes ε̂). The bound (eq. 8 up to its constant) is

  L = KL(q(x_T|x_0) ‖ N(0, I)) + Σ_{t>1} E_q KL(q_σ(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) − E_q log p_θ(x_0|x_1).

Both Gaussians of a KL share σ_t², so KL = ||μ_q − μ_p||²/(2σ_t²) with
μ_q − μ_p = √ᾱ_{t−1}(x_0 − x̂_0) + √(1 − ᾱ_{t−1} − σ_t²)(ε − ε̂): it grows as 1/η² when
η → 0 for an imperfect model. At t = 1 (our step 0) ᾱ_0 = 1 and the mean is x̂_0, as in
DDPM; its variance σ_1² is the decoder convention's (`variances.DECODERS`). With η = 1,
σ_t² = β̃_t and q_σ is DDPM's posterior, so L is the fixed_small bound.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, losses, schedules, variances
from ddpm_jax.losses import LOG2, mean_flat
from ddpm_jax.schedules import Schedule

Array = jax.Array


def ddim_mean_error(schedule: Schedule, x0: Array, noise: Array, pred_x0: Array, pred_eps: Array, t: Array,
                    sigma2: Array) -> Array:
    """Song et al. eq. 7 minus eq. 12: μ_q − μ_p = √ᾱ_{t−1}(x_0 − x̂_0) + √(1 − ᾱ_{t−1} − σ_t²)(ε − ε̂).

    noise: the ε of x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, so (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t) = ε; sigma2
    broadcastable to x0. The errors are subtracted before scaling, so nothing cancels.
    """
    # 1 − ᾱ_{t−1} from the float64-derived √(1 − ᾱ), as sampling.ddim_step.
    one_minus_ac_prev = jnp.concatenate([jnp.zeros(1), schedule.sqrt_one_minus_alphas_cumprod[:-1] ** 2])
    x0_coef = diffusion.extract(jnp.sqrt(schedule.alphas_cumprod_prev), t, x0.shape)
    eps_coef = jnp.sqrt(jnp.maximum(diffusion.extract(one_minus_ac_prev, t, x0.shape) - sigma2, 0.0))
    return x0_coef * (x0 - pred_x0) + eps_coef * (noise - pred_eps)


def ddim_kl_bpd(schedule: Schedule, x0: Array, noise: Array, pred_x0: Array, pred_eps: Array, t: Array,
                log_sigma2: Array) -> Array:
    """KL(q_σ(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) = ||μ_q − μ_p||²/(2σ_t²) per dimension, in bits, [B].

    log_sigma2: log σ_t² broadcastable to x0 ([B, 1, ..., 1]).
    """
    sigma2 = jnp.exp(log_sigma2)
    error = ddim_mean_error(schedule, x0, noise, pred_x0, pred_eps, t, sigma2)
    return mean_flat(0.5 * error**2 / sigma2) / LOG2


def ddim_vb_terms_bpd(schedule: Schedule, x0: Array, noise: Array, pred_x0: Array, pred_eps: Array, t: Array,
                      log_sigma2: Array, cdf: str = "exact") -> Array:
    """The KL term for t > 0 and L_0 = −log p(x_0|x_1)/d (Ho eq. 13, mean x̂_0, variance σ_1²) at t = 0, bits, [B]."""
    kl = ddim_kl_bpd(schedule, x0, noise, pred_x0, pred_eps, t, log_sigma2)
    log_scale = 0.5 * jnp.broadcast_to(log_sigma2, x0.shape)
    decoder_nll = -mean_flat(losses.discretized_gaussian_log_likelihood(x0, pred_x0, log_scale, cdf)) / LOG2
    return jnp.where(t == 0, decoder_nll, kl)


def ddim_bound_terms(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    log_sigma2s: Sequence[Array],
    *,
    mean_type: str = "eps",
    clip_x0: bool = False,
    cdf: str = "exact",
) -> list[dict[str, Array]]:
    """The DDIM bound of several σ(η) choices from ONE network call per step: [dict(total, prior, terms, mse)].

    log_sigma2s[j]: log σ_t² [K] of choice j on `schedule`, the decoder convention's at index 0
    (`variances.resolve(variances.ddim(η), chain, for_bound=True).log_variance`). Mirrors
    `losses.bound_terms`: one lax.scan over the K steps, the same key layout (so the same x_t
    draws), model_fn called with `schedule.timesteps`. Jit-able; `ddim_bpd_terms` validates.
    """
    channels = x0.shape[-1]

    def one_step(_, inputs):
        i, key = inputs
        t, noise, x_t = diffusion.q_draw(schedule, x0, i, key)
        output = model_fn(x_t, jnp.take(schedule.timesteps, t))[..., :channels]
        pred_x0, pred_eps = diffusion.predict_x0_eps(schedule, x_t, t, output, mean_type)
        if clip_x0:
            pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
            pred_eps = diffusion.x0_to_eps(schedule, x_t, t, pred_x0)
        mse = mean_flat((pred_eps - noise) ** 2)
        return None, [(ddim_vb_terms_bpd(schedule, x0, noise, pred_x0, pred_eps, t,
                                         diffusion.extract(log_sigma2, t, x0.shape), cdf), mse)
                            for log_sigma2 in log_sigma2s]

    keys = jax.random.split(rng, schedule.num_timesteps)
    _, out = jax.lax.scan(one_step, None, (jnp.arange(schedule.num_timesteps), keys))
    prior = losses.prior_bpd(schedule, x0)
    return [dict(total=jnp.sum(terms, axis=0) + prior, prior=prior, terms=terms, mse=mse) for terms, mse in out]


def ddim_log_variance(schedule: Schedule, eta: float, kept: np.ndarray, decoder: str | None = None) -> np.ndarray:
    """log σ_t(η)² [K] float32 on the sub-chain `kept` of the full chain `schedule` (Song et al. eq. 16), with the
    decoder convention's σ_1² at index 0 (default: the record's, 'sub_chain')."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be a float in (0, 1] (η = 0 has no bound: p is a point mass), got {eta!r}")
    chain = variances.chain(schedule, kept)
    return variances.resolve(variances.ddim(eta), chain, decoder=decoder, for_bound=True).log_variance


def ddim_bpd_terms(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    eta: float,
    decoder: str | None = None,
    num_steps: int | None = None,
    spacing: str = "even",
    steps: Sequence[int] | None = None,
    mean_type: str = "eps",
    clip_x0: bool = False,
    cdf: str = "exact",
) -> dict[str, Array]:
    """The DDIM(η) bound in bits/dim for each example of x0 [B, ...] in [−1, 1], on the sub-chain
    kept_steps(T, num_steps, spacing, steps) of the full chain `schedule` (the sampler's).

    Returns dict(total [B], prior [B], terms [K, B], mse [K, B]), as `losses.bpd_terms`. Eager: validates first.
    """
    kept = schedules.kept_steps(schedule.num_timesteps, num_steps, spacing, steps)
    log_sigma2 = ddim_log_variance(schedule, eta, kept, decoder)
    sub = schedules.sub_chain(schedule, kept)
    losses.check_bound_inputs(model_fn, sub, x0, ())
    losses.check_cdf(cdf)
    return ddim_bound_terms(model_fn, sub, x0, rng, (jnp.asarray(log_sigma2),), mean_type=mean_type,
                            clip_x0=clip_x0, cdf=cdf)[0]
