"""The DDIM bound (ddpm_jax.ddim_bound) against the ancestral bound, Monte Carlo KLs and its η → 0 law.

References: at η = 1, q_σ is DDPM's posterior (Song et al. 2021 eq. 16), so the bound must equal
`losses.bpd_terms` with σ² = β̃ (fixed_small) and the same x_t draws; each KL term against a
float64 NumPy Monte Carlo average of log q_σ(x_{t−1}|x_t, x_0) − log p_θ(x_{t−1}|x_t) over draws
of x_{t−1} ~ q_σ (Song et al. eq. 7); and KL ∝ 1/η² for small η.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from ddpm_jax import ddim_bound, diffusion, losses, schedules

import oracles

T = 10
DIM = 8


@pytest.fixture(scope="module")
def setup():
    schedule, mu, s, data = oracles.short_chain_problem(256, DIM, T)
    data = jnp.asarray(data)
    model_fn = oracles.gaussian_eps_oracle(schedule, mu + 0.1, 1.3 * s)  # imperfect: the KL mean terms are > 0
    return schedule, data, model_fn


@pytest.mark.parametrize("steps,decoder", [(None, "sub_chain"), ([0, 2, 5, 9], "sub_chain"),
                                           ([0, 3, 6, 9], "full_chain")])
def test_eta_one_equals_the_fixed_small_bound(setup, steps, decoder):
    schedule, data, model_fn = setup
    rng = jax.random.PRNGKey(1)
    ddim = ddim_bound.ddim_bpd_terms(model_fn, schedule, data, rng, eta=1.0, steps=steps, decoder=decoder)
    ancestral = losses.bpd_terms(model_fn, schedule, data, rng, variance="fixed_small", steps=steps, decoder=decoder)
    for key in ("terms", "total", "prior", "mse"):
        np.testing.assert_allclose(ddim[key], ancestral[key], rtol=2e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_kl_terms_match_monte_carlo(setup, eta):
    schedule, data, model_fn = setup
    steps = np.array([0, 2, 5, 9])
    sub = schedules.respace(schedule, steps)
    log_sigma2 = ddim_bound.ddim_log_variance(schedule, eta, steps)
    x0 = data[:4]
    key = jax.random.PRNGKey(2)
    for i in range(1, len(steps)):
        t = jnp.full((4,), i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape)
        x_t = diffusion.q_sample(sub, x0, t, noise)
        pred_x0, pred_eps = diffusion.predict_x0_eps(sub, x_t, t, model_fn(x_t, sub.timesteps[t]), "eps")
        kl = ddim_bound.ddim_kl_bpd(sub, x0, noise, pred_x0, pred_eps, t, diffusion.extract(jnp.asarray(log_sigma2), t, x0.shape))

        # Song et al. eq. 7 in float64, from ᾱ alone: both means and the draws x_{t−1} ~ q_σ.
        ac = np.asarray(sub.alphas_cumprod, np.float64)
        ac_t, ac_prev, sigma2 = ac[i], ac[i - 1], float(np.exp(np.float64(log_sigma2[i])))
        x0_, x_t_, x0_hat = (np.asarray(v, np.float64) for v in (x0, x_t, pred_x0))
        direction = np.sqrt(1 - ac_prev - sigma2) / np.sqrt(1 - ac_t)
        mean_q = np.sqrt(ac_prev) * x0_ + direction * (x_t_ - np.sqrt(ac_t) * x0_)
        mean_p = np.sqrt(ac_prev) * x0_hat + direction * (x_t_ - np.sqrt(ac_t) * x0_hat)
        draws = mean_q + np.sqrt(sigma2) * np.random.default_rng(i).standard_normal((100_000,) + x0_.shape)
        log_ratio = ((draws - mean_p) ** 2 - (draws - mean_q) ** 2) / (2 * sigma2)  # log q − log p per dimension
        per_example = log_ratio.mean(axis=-1) / np.log(2.0)  # [draws, B] bits/dim
        mc, se = per_example.mean(axis=0), per_example.std(axis=0) / np.sqrt(per_example.shape[0])
        assert np.all(np.abs(np.asarray(kl) - mc) < 4 * se + 1e-6), (i, np.asarray(kl), mc, se)


def test_kl_grows_as_one_over_eta_squared(setup):
    schedule, data, model_fn = setup
    steps = np.array([0, 2, 5, 9])
    sub = schedules.respace(schedule, steps)
    rng = jax.random.PRNGKey(3)
    etas = (1e-1, 1e-2, 1e-3)
    log_sigma2s = tuple(jnp.asarray(ddim_bound.ddim_log_variance(schedule, eta, steps)) for eta in etas)
    outs = jax.jit(ddim_bound.ddim_bound_terms)(Partial(model_fn), sub, data, rng, log_sigma2s)
    kl = [np.asarray(out["terms"][1:], np.float64).sum(axis=0).mean() for out in outs]  # Σ_{t>1} KL, mean over data
    scaled = [eta**2 * value for eta, value in zip(etas, kl)]
    assert kl[0] < kl[1] < kl[2]
    np.testing.assert_allclose(scaled[2], scaled[1], rtol=1e-3)  # η²·KL has converged to its η → 0 limit
    # The limit in float64: η²·KL → Σ_t ||√ᾱ_{t−1}(x_0 − x̂_0) + √(1 − ᾱ_{t−1})(ε − ε̂)||²/(2β̃_t d).
    keys = jax.random.split(rng, len(steps))
    ac = np.asarray(sub.alphas_cumprod, np.float64)
    beta_tilde = np.asarray(sub.posterior_variance, np.float64)
    limit = 0.0
    for i in range(1, len(steps)):
        t = jnp.full(data.shape[:1], i, jnp.int32)
        noise = jax.random.normal(keys[i], data.shape)
        x_t = diffusion.q_sample(sub, data, t, noise)
        pred_x0, pred_eps = diffusion.predict_x0_eps(sub, x_t, t, model_fn(x_t, sub.timesteps[t]), "eps")
        error = (np.sqrt(ac[i - 1]) * (np.asarray(data, np.float64) - np.asarray(pred_x0, np.float64))
                 + np.sqrt(1 - ac[i - 1]) * (np.asarray(noise, np.float64) - np.asarray(pred_eps, np.float64)))
        limit += np.mean(error**2) / (2 * beta_tilde[i]) / np.log(2.0)
    np.testing.assert_allclose(scaled[2], limit, rtol=2e-3)


def test_refuses_eta_zero(setup):
    schedule, data, model_fn = setup
    with pytest.raises(ValueError, match="eta"):
        ddim_bound.ddim_bpd_terms(model_fn, schedule, data, jax.random.PRNGKey(0), eta=0.0)
