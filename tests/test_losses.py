"""Tests for ddpm_jax/losses.py against closed forms, scipy, Monte Carlo and the Gaussian-data oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from ddpm_jax import diffusion, losses, schedules
import oracles

LN2 = np.log(2.0)
GRID = np.arange(256) / 127.5 - 1.0  # the 8-bit values in [−1, 1]


# --------------------------------------------------------------------------
# Gaussian KL.


@settings(max_examples=50, deadline=None)
@given(m1=st.floats(-3, 3), m2=st.floats(-3, 3), lv1=st.floats(-8, 3), lv2=st.floats(-8, 3))
def test_normal_kl_closed_form(m1, m2, lv1, lv2):
    s1, s2 = np.exp(lv1 / 2), np.exp(lv2 / 2)
    expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    kl = losses.normal_kl(*(jnp.float32(v) for v in (m1, lv1, m2, lv2)))
    scale = abs(lv1 - lv2) + s1**2 / s2**2 + (m1 - m2) ** 2 / s2**2 + 1
    assert abs(float(kl) - expected) <= 1e-5 * scale
    assert abs(float(losses.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m1), jnp.float32(lv1)))) < 1e-6


def test_normal_kl_monte_carlo():
    m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
    x = np.random.default_rng(0).normal(m1, np.exp(lv1 / 2), 1_000_000)
    ratio = stats.norm.logpdf(x, m1, np.exp(lv1 / 2)) - stats.norm.logpdf(x, m2, np.exp(lv2 / 2))
    kl = float(losses.normal_kl(m1, lv1, m2, lv2))
    assert abs(ratio.mean() - kl) <= 5 * ratio.std() / np.sqrt(len(x))


# --------------------------------------------------------------------------
# Discretized Gaussian decoder (Ho eq. 13).


def _log_bin_probs_float64(x, mean, scale):
    """log P(bin of x) in float64 for N(mean, scale²), edge bins open; stable in both tails (log_ndtr)."""
    upper = np.where(x > 0.999, np.inf, (x - mean + 1 / 255) / scale)
    lower = np.where(x < -0.999, -np.inf, (x - mean - 1 / 255) / scale)
    flip = lower > 0  # use the upper tail there: Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
    hi, lo = np.where(flip, -lower, upper), np.where(flip, -upper, lower)
    log_hi, log_lo = special.log_ndtr(hi), special.log_ndtr(lo)
    return log_hi + np.log1p(-np.exp(log_lo - log_hi))


PARAMS = [(0.0, 0.5), (0.3, 0.01), (-0.999, 1e-3), (1.5, 0.5), (0.2, 3.0), (-2.0, 0.05), (0.77, 1e-4)]


@pytest.mark.parametrize("mean, scale", PARAMS)
def test_decoder_bins_sum_to_one_and_match_scipy(mean, scale):
    x = jnp.asarray(GRID, jnp.float32)
    log_p = losses.discretized_gaussian_log_likelihood(x, jnp.float32(mean), jnp.log(jnp.float32(scale)))
    x64, mean64, scale64 = np.asarray(x, np.float64), float(np.float32(mean)), float(np.float32(scale))
    expected = _log_bin_probs_float64(x64, mean64, scale64)
    assert np.all(np.isfinite(log_p))  # also 2000 standard deviations out
    np.testing.assert_allclose(log_p, expected, rtol=1e-4, atol=2e-5)
    assert abs(np.exp(_log_bin_probs_float64(GRID, mean, scale)).sum() - 1) < 1e-12  # on the exact grid
    assert abs(np.exp(np.asarray(log_p, np.float64)).sum() - 1) < 2e-5


def _ho_tanh_log_probs(x, mean, log_scale):
    """Ho et al.'s code (diffusion_utils_2.py): tanh approximation of Φ and clamps at 1e-12."""
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    inv = np.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    log_probs = np.where(
        x < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    active = np.where(x < -0.999, cdf_plus, np.where(x > 0.999, 1 - cdf_min, cdf_plus - cdf_min)) <= 1e-12
    return log_probs, active, cdf


def test_decoder_equals_hos_tanh_version_where_the_clamp_is_inactive():
    z = np.linspace(-10, 10, 200_001)
    _, _, cdf = _ho_tanh_log_probs(0.0, 0.0, 0.0)
    approx_error = np.max(np.abs(cdf(z) - special.ndtr(z)))  # the tanh approximation's own error, ~2e-4
    assert approx_error < 3e-4
    for mean, scale in PARAMS:
        x = jnp.asarray(GRID, jnp.float32)
        ours = np.asarray(losses.discretized_gaussian_log_likelihood(x, jnp.float32(mean), jnp.log(jnp.float32(scale))))
        ho, clamped, _ = _ho_tanh_log_probs(GRID, mean, np.log(scale))
        # A bin probability is a difference of two CDF values: at most 2× the approximation error apart.
        np.testing.assert_allclose(np.exp(ours[~clamped]), np.exp(ho[~clamped]), atol=2 * approx_error + 1e-6)
        # Where Ho clamps at 1e-12 (far tails) the exact value is finite, and small within the same error.
        assert np.all(np.exp(ours[clamped]) <= 1e-12 + 2 * approx_error) and np.all(np.isfinite(ours))


def test_decoder_gradients_are_finite_in_the_tails():
    x = jnp.asarray(GRID, jnp.float32)

    def total(mean, log_scale):
        return jnp.sum(losses.discretized_gaussian_log_likelihood(x, mean, log_scale))

    for mean, scale in PARAMS:
        grads = jax.grad(total, argnums=(0, 1))(jnp.float32(mean), jnp.log(jnp.float32(scale)))
        assert all(np.isfinite(g) for g in grads), (mean, scale)


# --------------------------------------------------------------------------
# Prior term and training losses.


@pytest.mark.parametrize("chain", ["linear", "short", "respaced"])
def test_prior_bpd_closed_form(chain):
    full = schedules.get_schedule("linear", 1000)
    schedule = {
        "linear": full,
        "short": schedules.get_schedule("quadratic", 50),  # ᾱ_T ≈ 0.7: a large prior term
        "respaced": schedules.respace(full, [0, 10, 400]),
    }[chain]
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 2)), jnp.float32)
    ac = float(np.asarray(schedule.alphas_cumprod, np.float64)[-1])
    x = np.asarray(x0, np.float64)
    kl = 0.5 * (-1 - np.log(1 - ac) + (1 - ac) + ac * x**2)  # KL(N(√ᾱ x0, 1 − ᾱ) ‖ N(0, 1))
    expected = kl.reshape(3, -1).mean(1) / LN2
    np.testing.assert_allclose(losses.prior_bpd(schedule, x0), expected, rtol=1e-4, atol=2e-7)


def _setup(T=50, shape=(4, 3, 3, 2), seed=0):
    schedule = schedules.get_schedule("cosine", T)
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(np.round(rng.uniform(-1, 1, shape) * 127.5) / 127.5, jnp.float32)  # on the 8-bit grid
    noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    t = jnp.asarray([0, 1, T // 2, T - 1], jnp.int32)
    output = jnp.asarray(rng.standard_normal(shape[:-1] + (2 * shape[-1],)) * 0.5, jnp.float32)
    return schedule, x0, noise, t, output


def _vb_float64(schedule, x0, noise, t, output):
    """L_{t−1} (KL of the posterior to p, t > 0) or L_0 (decoder) in bits/dim, float64, learned_range, ε."""
    f = {k: np.asarray(getattr(schedule, k), np.float64)[np.asarray(t)].reshape(-1, 1, 1, 1) for k in (
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
        "posterior_log_variance_clipped", "log_betas")}  # fmt: skip
    x0, noise, output = (np.asarray(a, np.float64) for a in (x0, noise, output))
    eps, v = np.split(output, 2, axis=-1)
    x_t = f["sqrt_alphas_cumprod"] * x0 + f["sqrt_one_minus_alphas_cumprod"] * noise
    x0_hat = (x_t - f["sqrt_one_minus_alphas_cumprod"] * eps) / f["sqrt_alphas_cumprod"]
    true_mean = f["posterior_mean_coef1"] * x0 + f["posterior_mean_coef2"] * x_t
    mean = f["posterior_mean_coef1"] * x0_hat + f["posterior_mean_coef2"] * x_t
    frac = (v + 1) / 2
    log_var = frac * f["log_betas"] + (1 - frac) * f["posterior_log_variance_clipped"]
    lv1 = f["posterior_log_variance_clipped"]
    kl = 0.5 * (-1 + log_var - lv1 + np.exp(lv1 - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
    nll = -_log_bin_probs_float64(x0, mean, np.exp(0.5 * log_var))
    per_step = np.where(np.asarray(t).reshape(-1, 1, 1, 1) == 0, nll, kl)
    return per_step.reshape(len(t), -1).mean(1) / LN2, (eps - np.asarray(noise)) ** 2


@pytest.mark.parametrize("loss_type", ["simple", "vlb", "hybrid"])
def test_training_losses_match_float64(loss_type):
    schedule, x0, noise, t, output = _setup()
    terms = losses.training_losses(schedule, output, x0, t, noise, loss_type=loss_type, variance="learned_range")
    vb, sq = _vb_float64(schedule, x0, noise, t, output)
    mse = sq.reshape(len(t), -1).mean(1)
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-5)
    expected = {"simple": mse, "vlb": schedule.num_timesteps * vb, "hybrid": mse + 1e-3 * schedule.num_timesteps * vb}
    np.testing.assert_allclose(terms["loss"], expected[loss_type], rtol=2e-4)


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
def test_simple_loss_targets(mean_type):
    schedule, x0, noise, t, output = _setup()
    out = output[..., :2]
    terms = losses.training_losses(schedule, out, x0, t, noise, mean_type=mean_type)
    sa, s1 = (np.asarray(getattr(schedule, k), np.float64)[np.asarray(t)].reshape(-1, 1, 1, 1)
              for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))  # fmt: skip
    x0_, noise_ = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
    target = {"eps": noise_, "x0": x0_, "v": sa * noise_ - s1 * x0_}[mean_type]  # v: Salimans & Ho 2022
    expected = ((target - np.asarray(out, np.float64)) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-5)


def test_hybrid_stops_the_gradient_of_the_vb_term_at_the_mean():
    """N&D §3.1: in L_hybrid, L_vlb trains only the variance; in L_vlb it trains both."""
    schedule, x0, noise, t, output = _setup()

    def vb(out, loss_type):
        terms = losses.training_losses(schedule, out, x0, t, noise, loss_type=loss_type, variance="learned_range")
        return jnp.sum(terms["vb"])

    for loss_type in ("hybrid", "vlb"):
        grad = np.asarray(jax.grad(vb)(output, loss_type))
        mean_part, var_part = np.split(grad, 2, axis=-1)
        assert np.all(np.isfinite(grad)) and np.any(var_part != 0)
        assert np.all(mean_part == 0) if loss_type == "hybrid" else np.any(mean_part != 0)


@pytest.mark.parametrize(
    "loss_type, variance, message",
    [("kl", "learned_range", "loss_type must be one of"), ("hybrid", "fixed_small", "variance must be one whose"),
     ("vlb", "analytic", "variance must be one whose"), ("vlb", "fixed_large", "variance must be one whose"),
     ("simple", "wide", "variance must be one of")],
)  # fmt: skip
def test_invalid_loss_type_and_variance(loss_type, variance, message):
    schedule, x0, noise, t, output = _setup()
    with pytest.raises(ValueError, match=message):
        losses.training_losses(schedule, output, x0, t, noise, loss_type=loss_type, variance=variance)


# --------------------------------------------------------------------------
# The whole bound with the exact ε for Gaussian data on the 8-bit grid.

MU = np.array([0.1, -0.3, 0.0, 0.5])
S = np.array([0.1, 0.15, 0.2, 0.3])


def test_grid_nll_oracle_averages_to_the_entropy():
    x0 = oracles.gaussian_grid_data(np.random.default_rng(0), MU, S, 100_000)
    nll = oracles.gaussian_grid_nll_bpd(x0, MU, S)
    assert abs(nll.mean() - oracles.gaussian_nll_bpd(MU, S)) <= 5 * nll.std() / np.sqrt(len(nll))


@pytest.mark.parametrize("num_steps", [100, 10])
def test_bound_with_the_exact_eps_is_above_the_true_nll(num_steps):
    """E[bound(x)] ≥ E[−log p_θ(x)] ≥ E[−log P(x)] = H: no model beats the data's own law P.

    Compared per example (bound(x) + log₂ P(x)) to cancel most data noise. Analytic-DPM's σ² is
    optimal per step (Bao et al. Thm. 1), so with the same noise it gives the smallest bound of the three.
    """
    full = schedules.get_schedule("linear", 100)
    x0 = oracles.gaussian_grid_data(np.random.default_rng(num_steps), MU, S, 20_000)
    true_nll = oracles.gaussian_grid_nll_bpd(x0, MU, S)
    model_fn = oracles.gaussian_eps_oracle(full, MU, S)
    stats = {"gamma": oracles.gaussian_gamma(full, S)}  # [T]; the bound reads it at the kept steps
    totals = {}
    for variance in ("fixed_small", "fixed_large", "analytic"):
        out = losses.bpd_terms(model_fn, full, jnp.asarray(x0), jax.random.PRNGKey(0), variance=variance, stats=stats,
                               num_steps=num_steps)
        total, terms = np.asarray(out["total"], np.float64), np.asarray(out["terms"])
        assert terms.shape == (num_steps, len(x0)) and np.all(np.isfinite(terms))
        assert np.all(terms[1:] >= -1e-6)  # KL terms; rounding only below zero
        gap = total - true_nll
        assert gap.mean() > 4 * gap.std() / np.sqrt(len(gap)), (variance, gap.mean())
        totals[variance] = total.mean()
    assert totals["analytic"] < min(totals["fixed_small"], totals["fixed_large"])


def test_bpd_terms_validates_its_inputs():
    full = schedules.get_schedule("linear", 100)
    model_fn = oracles.gaussian_eps_oracle(full, MU, S)
    x0 = jnp.asarray(oracles.gaussian_grid_data(np.random.default_rng(0), MU, S, 4))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="must start at step 0"):  # L_0 is the decoder on the data
        losses.bpd_terms(model_fn, full, x0, key, steps=[10, 50, 99])
    with pytest.raises(ValueError, match="model_fn output must have shape"):
        losses.bpd_terms(lambda x, t: x[..., :1], full, x0, key, num_steps=5)
    with pytest.raises(ValueError, match="2C channels"):  # σ² from the network needs its C extra channels
        losses.bpd_terms(model_fn, full, x0, key, variance="learned_range", num_steps=5)
    with pytest.raises(ValueError, match="x0 must be finite and lie in \\[-1, 1\\]"):
        losses.bpd_terms(model_fn, full, 1.5 * x0 + 0.5, key, num_steps=5)
    with pytest.raises(ValueError, match="needs stats \\['gamma'\\]"):
        losses.bpd_terms(model_fn, full, x0, key, variance="analytic", num_steps=5)
    with pytest.raises(ValueError, match="variance 'ddim_eta0.5' .*bound"):  # DDIM's bound needs q_σ, not this one
        losses.bpd_terms(model_fn, full, x0, key, variance="ddim_eta0.5", num_steps=5)


def test_bound_is_prior_plus_every_term_each_recomputed_in_float64():
    """Ho eq. 5: L = L_T + Σ_{t>1} L_{t−1} + L_0, every piece recomputed in float64 from the β's alone.

    A short chain (ᾱ_T ≈ 0.86) makes L_T ≈ 0.8 bits/dim, so a bound that drops the prior is far off. The
    x_t draws are rebuilt from the bound's key layout (one key per step, jax.random.split).
    """
    schedule = schedules.get_schedule("quadratic", 20)
    K = schedule.num_timesteps
    mu, s = 0.1, np.linspace(0.1, 0.3, 8).reshape(2, 2, 2)
    x0 = jnp.asarray(oracles.gaussian_grid_data(np.random.default_rng(3), mu, s, 6))
    model_fn = oracles.gaussian_eps_oracle(schedule, mu + 0.05, 1.2 * s)  # imperfect: KL terms > 0
    rng = jax.random.PRNGKey(7)
    out = losses.bpd_terms(model_fn, schedule, x0, rng, variance="fixed_large")

    b = np.asarray(schedule.betas, np.float64)
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    beta_tilde = b * (1.0 - ac_prev) / (1.0 - ac)
    sigma2 = np.append(beta_tilde[1], b[1:])  # fixed_large, decoder 'sub_chain' (K = T): σ_1² = β̃_2
    x = np.asarray(x0, np.float64)
    # L_T = KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1)) per dimension, in bits.
    prior = (0.5 * (-1 - np.log(1 - ac[-1]) + (1 - ac[-1]) + ac[-1] * x**2)).reshape(len(x), -1).mean(1) / LN2
    terms = []
    for i, key in enumerate(jax.random.split(rng, K)):
        noise = np.asarray(jax.random.normal(key, x0.shape, x0.dtype), np.float64)
        x_t = np.sqrt(ac[i]) * x + np.sqrt(1 - ac[i]) * noise
        eps = np.asarray(model_fn(jnp.asarray(x_t, jnp.float32), jnp.full((len(x),), i, jnp.int32)), np.float64)
        x0_hat = (x_t - np.sqrt(1 - ac[i]) * eps) / np.sqrt(ac[i])
        coef1, coef2 = np.sqrt(ac_prev[i]) * b[i] / (1 - ac[i]), (1 - ac_prev[i]) * np.sqrt(1 - b[i]) / (1 - ac[i])
        mean = coef1 * x0_hat + coef2 * x_t
        if i == 0:
            per_dim = -_log_bin_probs_float64(x, mean, np.sqrt(sigma2[0]))
        else:
            true_mean = coef1 * x + coef2 * x_t
            per_dim = 0.5 * (np.log(sigma2[i] / beta_tilde[i]) + beta_tilde[i] / sigma2[i] - 1
                             + (true_mean - mean) ** 2 / sigma2[i])
        terms.append(per_dim.reshape(len(x), -1).mean(1) / LN2)
    terms = np.stack(terms)
    assert prior.mean() > 0.5  # the prior is a large part of this bound
    np.testing.assert_allclose(out["prior"], prior, rtol=1e-4)
    np.testing.assert_allclose(out["terms"], terms, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(out["total"], terms.sum(0) + prior, rtol=1e-3)
