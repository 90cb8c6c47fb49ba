"""Training losses and the variational bound (Ho et al. 2020 §3; Nichol & Dhariwal 2021 §3.1).

L_vlb = L_T + Σ_{t>1} L_{t−1} + L_0 (Ho eq. 5), with
  L_T     = KL(q(x_T|x_0) ‖ N(0, I))                       (prior term)
  L_{t−1} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t))     (Gaussian KL)
  L_0     = −log p_θ(x_0|x_1)                              (discretized decoder, Ho §3.3)
All per-example terms are returned in bits per dimension.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, schedules, variances
from ddpm_jax.schedules import Schedule

Array = jax.Array
LOG2 = float(np.log(2.0))


def mean_flat(x: Array) -> Array:
    """Mean over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) elementwise, in nats: ½(−1 + log σ₂²/σ₁² + σ₁²/σ₂² + (μ₁ − μ₂)²/σ₂²)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def log_normal_cdf_diff(lower: Array, upper: Array) -> Array:
    """log(Φ(upper) − Φ(lower)) for upper > lower, stable in both tails.

    In the right tail the difference is taken as Φ(−lower) − Φ(−upper), so it
    never cancels two numbers close to 1.
    """
    flip = lower > 0.0
    lo = jnp.where(flip, -upper, lower)
    hi = jnp.where(flip, -lower, upper)
    log_hi = jax.scipy.stats.norm.logcdf(hi)
    log_lo = jax.scipy.stats.norm.logcdf(lo)
    return log_hi + jnp.log(-jnp.expm1(jnp.minimum(log_lo - log_hi, -1e-30)))


CDFS = ("exact", "tanh")  # the decoder's normal CDF: exact log Φ, or Ho's / improved-diffusion's approximation


def check_cdf(cdf: str) -> None:
    """cdf must name a decoder CDF convention (`CDFS`)."""
    if cdf not in CDFS:
        raise ValueError(f"cdf must be one of {CDFS}, got {cdf!r}")


def approx_standard_normal_cdf(x: Array) -> Array:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))): the approximation in Ho et al.'s and improved-diffusion's code."""
    return 0.5 * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x**3)))


def tanh_discretized_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """Ho eq. 13 as their released code computes it: tanh-approximated Φ, each probability clamped at 1e-12."""
    inv_stdv = jnp.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (x - mean + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (x - mean - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array, cdf: str = "exact") -> Array:
    """Ho eq. 13: log p(x) for 8-bit data scaled to [−1, 1], elementwise, in nats.

    Each of the 256 values owns the bin [x − 1/255, x + 1/255]; the two edge bins
    extend to ∓∞. cdf='exact' (default) uses log Φ, stable in both tails; cdf='tanh'
    is Ho's and improved-diffusion's code (`tanh_discretized_log_likelihood`), whose
    tables are computed with it (it moves L_0 by up to ~0.03 bits/dim per image).
    """
    check_cdf(cdf)
    if cdf == "tanh":
        return tanh_discretized_log_likelihood(x, mean, log_scale)
    inv_stdv = jnp.exp(-log_scale)
    upper = inv_stdv * (x - mean + 1.0 / 255.0)
    lower = inv_stdv * (x - mean - 1.0 / 255.0)
    log_cdf_upper = jax.scipy.stats.norm.logcdf(upper)
    log_one_minus_cdf_lower = jax.scipy.stats.norm.logcdf(-lower)
    log_bin = log_normal_cdf_diff(lower, upper)
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_bin))


def prior_bpd(schedule: Schedule, x0: Array) -> Array:
    """L_T in bits/dim: KL(q(x_T|x_0) ‖ N(0, I)) at the last step of the (sub-)chain, [B]."""
    t = jnp.full(x0.shape[:1], schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = diffusion.q_mean_variance(schedule, x0, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LOG2


def vb_terms_bpd(schedule: Schedule, p_out: dict, x0: Array, x_t: Array, t: Array, cdf: str = "exact") -> Array:
    """L_{t−1} (Gaussian KL) for t > 0 and L_0 (decoder NLL, normal CDF `cdf`) for t = 0, in bits/dim, [B].

    p_out is the dict of `diffusion.p_mean_variance` for (x_t, t).
    """
    true_mean, _, true_log_variance = diffusion.q_posterior(schedule, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, p_out["mean"], p_out["log_variance"])) / LOG2
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p_out["mean"], 0.5 * p_out["log_variance"],
                                                                 cdf)) / LOG2
    return jnp.where(t == 0, decoder_nll, kl)


LOSS_TYPES = ("simple", "hybrid", "vlb")
HYBRID_LAMBDA = 0.001  # N&D §3.1


def validate_loss_type(loss_type: str, variance) -> variances.Variance:
    """The σ record of `variance`, after checking that loss_type can train it (L_vlb/L_hybrid need σ from the network)."""
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    record = variances.get(variance)
    if loss_type != "simple" and not record.from_network:
        learned = sorted(name for name, v in variances.VARIANCES.items() if v.from_network)
        raise ValueError(f"loss_type={loss_type!r} trains the variance, so variance must be one whose σ² the "
                         f"network outputs, one of {learned}, got {record.name!r}")
    return record


def training_losses(
    schedule: Schedule,
    model_output: Array,
    x0: Array,
    t: Array,
    noise: Array,
    *,
    loss_type: str = "simple",
    variance: str | variances.Variance = "fixed_small",
    mean_type: str = "eps",
) -> dict[str, Array]:
    """Per-example losses [B] for x_t = q_sample(x0, t, noise) and the network output at (x_t, t).

    simple: L_simple = ‖target − output‖² (Ho eq. 14; target ε, x_0 or v).
    vlb:    T·L_t (an unbiased estimate of L_vlb for uniform t).
    hybrid: L_simple + λ·T·L_t with λ = 0.001 and stop-gradient on the mean in L_t (N&D eq. 16).
    """
    record = validate_loss_type(loss_type, variance)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    mean_out, var_out = diffusion.split_model_output(model_output, record.from_network)
    target = {"eps": noise, "x0": x0, "v": diffusion.x0_eps_to_v(schedule, x0, t, noise)}[mean_type]
    mse = mean_flat((target - mean_out) ** 2)
    terms = {"mse": mse}
    if loss_type == "simple":
        terms["loss"] = mse
        return terms
    frozen = mean_out if loss_type == "vlb" else jax.lax.stop_gradient(mean_out)
    log_var = record.network(schedule, var_out, t)
    p_out = diffusion.p_mean_variance(schedule, frozen, x_t, t, log_var, mean_type=mean_type)
    vb = vb_terms_bpd(schedule, p_out, x0, x_t, t) * schedule.num_timesteps
    terms["vb"] = vb
    terms["loss"] = vb if loss_type == "vlb" else mse + HYBRID_LAMBDA * vb
    return terms


# --------------------------------------------------------------------------
# The whole bound (Ho eq. 5) on a (sub-)chain.


def bound_terms(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    log_variances: Sequence[Array | None],
    *,
    networks: Sequence[variances.NetworkFn | None],
    mean_type: str = "eps",
    clip_x0: bool = False,
    cdf: str = "exact",
) -> list[dict[str, Array]]:
    """The bound of several resolved σ choices from ONE network call per step: [dict(total, prior, terms, mse)].

    log_variances[j]: choice j's log σ² [K] on `schedule` (None when networks[j] reads σ² from
    the network's extra C channels). Every choice sees the same x_t draws (a paired comparison)
    and the cost is that of one. One lax.scan over the K steps, a fresh x_t ~ q(x_t|x_0) per step;
    model_fn is called with the original step indices `schedule.timesteps`. Jit-able; callers
    validate (`bpd_terms`, `evaluation.nll`).
    """
    channels = x0.shape[-1]

    def one_step(_, inputs):
        i, key = inputs
        t, noise, x_t = diffusion.q_draw(schedule, x0, i, key)
        output = model_fn(x_t, jnp.take(schedule.timesteps, t))
        out = []
        for log_variance, network in zip(log_variances, networks):
            var_out = output[..., channels:] if network is not None else None
            log_var = variances.batch_log_variance(network, log_variance, schedule, var_out, t, x0.shape)
            p_out = diffusion.p_mean_variance(schedule, output[..., :channels], x_t, t, log_var,
                                              mean_type=mean_type, clip_x0=clip_x0)
            out.append((vb_terms_bpd(schedule, p_out, x0, x_t, t, cdf), mean_flat((p_out["pred_eps"] - noise) ** 2)))
        return None, out

    keys = jax.random.split(rng, schedule.num_timesteps)
    _, out = jax.lax.scan(one_step, None, (jnp.arange(schedule.num_timesteps), keys))
    prior = prior_bpd(schedule, x0)
    return [dict(total=jnp.sum(terms, axis=0) + prior, prior=prior, terms=terms, mse=mse) for terms, mse in out]


def check_bound_inputs(model_fn, schedule: Schedule, x0, choices: Sequence[variances.Resolved]) -> None:
    """One ValueError naming the argument, before anything is traced: x0 [B, ...] in [−1, 1], a chain that
    starts at the data (step 0), and a model output of x0's shape with C channels (2C when σ² comes
    from the network)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a ddpm_jax.schedules.Schedule, got {type(schedule).__name__}")
    if int(np.asarray(schedule.timesteps)[0]) != 0:
        raise ValueError("schedule must start at step 0 (its L_0 is the decoder on the data): a sub-chain must keep "
                         f"t = 0, got timesteps starting {np.asarray(schedule.timesteps)[:3].tolist()}")
    shape = np.shape(x0)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"x0 must have shape [B, ...] with B >= 1, got {shape}")
    if not isinstance(x0, jax.core.Tracer):
        values = np.asarray(x0)
        if not np.all(np.isfinite(values)) or values.min() < -1.0 or values.max() > 1.0:
            raise ValueError("x0 must be finite and lie in [-1, 1] (data scaled as in Ho et al. §3.3)")
    learned = any(c.network is not None for c in choices)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    out = jax.eval_shape(model_fn, jax.ShapeDtypeStruct(shape, jnp.float32), t).shape
    with_variance = (*shape[:-1], variances.model_channels(shape[-1], True))
    allowed = [with_variance] if learned else [shape, with_variance]
    if out not in allowed:
        raise ValueError(f"model_fn output must have shape {allowed[0]} for x0 of shape {shape} (2C channels when "
                         f"σ² comes from the network; a fixed σ reads the first C), got {out}")


def bpd_terms(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    variance: str | variances.Variance = "fixed_small",
    stats: Mapping[str, np.ndarray] | None = None,
    decoder: str | None = None,
    num_steps: int | None = None,
    spacing: str = "even",
    steps: Sequence[int] | None = None,
    mean_type: str = "eps",
    clip_x0: bool = False,
    cdf: str = "exact",
) -> dict[str, Array]:
    """The whole variational bound (Ho eq. 5) in bits/dim for each example of x0 [B, ...] in [−1, 1].

    schedule: the full chain, run on the sub-chain kept_steps(T, num_steps, spacing, steps); or,
    with none of those given, the chain itself (a respaced schedule must start at step 0, so its
    L_0 is the decoder on the data). variance/stats/decoder as in `sampling.sample`; cdf: the
    decoder's normal CDF, 'exact' or 'tanh' (Ho's / improved-diffusion's code).
    Returns dict(total [B], prior [B], terms [K, B], mse [K, B]). Eager: validates first.
    """
    if num_steps is not None or steps is not None:
        kept = schedules.kept_steps(schedule.num_timesteps, num_steps, spacing, steps)
        sub, c = schedules.sub_chain(schedule, kept), variances.chain(schedule, kept)
    else:
        sub, c = schedule, variances.chain(schedule)
    check_has_bound(variances.get(variance))
    resolved = variances.resolve(variance, c, stats, decoder=decoder, for_bound=True)
    check_bound_inputs(model_fn, sub, x0, (resolved,))
    check_cdf(cdf)
    return bound_terms(model_fn, sub, x0, rng, (_as_array(resolved.log_variance),), networks=(resolved.network,),
                       mean_type=mean_type, clip_x0=clip_x0, cdf=cdf)[0]


def check_has_bound(record: variances.Variance, *, ddim_allowed: bool = False) -> None:
    if not record.has_bound:
        raise ValueError(f"variance {record.name!r} has no bound: {record.bound_note}")
    if record.ddim_eta is not None and not ddim_allowed:
        raise ValueError(f"variance {record.name!r} is DDIM: its bound is ddim_bound.ddim_bpd_terms (with q_σ, "
                         f"Song et al. eqs. 7–8), or evaluation.nll for a data split")


def _as_array(values: np.ndarray | None) -> Array | None:
    return None if values is None else jnp.asarray(values)
