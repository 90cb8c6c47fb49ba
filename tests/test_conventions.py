"""The decoder's normal CDF convention: exact log Φ against scipy, Ho's / improved-diffusion's tanh approximation
against a float64 NumPy transcription of its formula, and the bound differing only in L_0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import oracles
from ddpm_jax import losses, schedules
from ddpm_jax.evaluation import nll


def _grid_points(rng, n=4000):
    x = (rng.integers(0, 256, n) / 127.5 - 1.0).astype(np.float32)
    mean = np.clip(x + rng.normal(0.0, 0.02, n), -1.2, 1.2).astype(np.float32)
    log_scale = rng.uniform(np.log(1e-3), np.log(0.3), n).astype(np.float32)
    return x, mean, log_scale


def _tanh_reference(x, mean, log_scale):
    """improved-diffusion's discretized_gaussian_log_likelihood in float64 NumPy (Φ ≈ ½(1 + tanh(√(2/π)(u + 0.044715u³))))."""
    x, mean, log_scale = (np.asarray(v, np.float64) for v in (x, mean, log_scale))
    phi = lambda u: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u**3)))
    inv = np.exp(-log_scale)
    plus, minus = phi(inv * (x - mean + 1 / 255)), phi(inv * (x - mean - 1 / 255))
    bin_ = np.log(np.maximum(plus - minus, 1e-12))
    return np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1.0 - minus, 1e-12)), bin_))


def _exact_reference(x, mean, log_scale):
    x, mean, log_scale = (np.asarray(v, np.float64) for v in (x, mean, log_scale))
    s = np.exp(log_scale)
    upper = np.where(x > 0.999, np.inf, (x - mean + 1 / 255) / s)
    lower = np.where(x < -0.999, -np.inf, (x - mean - 1 / 255) / s)
    flip = lower > 0  # in the right tail take Φ(−lower) − Φ(−upper): no cancellation of two numbers near 1
    lo, hi = np.where(flip, -upper, lower), np.where(flip, -lower, upper)
    with np.errstate(divide="ignore"):
        return np.log(special.ndtr(hi) - special.ndtr(lo))


def test_each_cdf_matches_its_float64_reference():
    x, mean, log_scale = _grid_points(np.random.default_rng(0))
    tanh = np.asarray(losses.discretized_gaussian_log_likelihood(x, mean, log_scale, "tanh"), np.float64)
    exact = np.asarray(losses.discretized_gaussian_log_likelihood(x, mean, log_scale, "exact"), np.float64)
    ref_tanh, ref_exact = _tanh_reference(x, mean, log_scale), _exact_reference(x, mean, log_scale)
    # In float32 (as their code runs) Φ(u⁺) − Φ(u⁻) cancels for small bin probabilities, so the comparison is
    # to rounding where the probability is above 1e-3; below it both only need to be small.
    live = ref_tanh > np.log(1e-3)
    np.testing.assert_allclose(tanh[live], ref_tanh[live], rtol=2e-4, atol=2e-4)
    assert np.all(tanh[~live] < np.log(2e-3))
    finite = ref_exact > -60
    np.testing.assert_allclose(exact[finite], ref_exact[finite], rtol=2e-4, atol=2e-5)
    # The two conventions differ: by up to ~0.1 nat for a bin of probability ~1e-3, far less for likely bins.
    close = live & (ref_exact > np.log(1e-3))
    gap = np.abs(tanh - exact)[close]
    assert 0 < gap.max() < 0.2 and np.median(gap) < 1e-3


def test_the_bound_with_the_tanh_cdf_differs_only_in_the_decoder_term():
    schedule = schedules.get_schedule("linear", 100)
    mu, s = np.full(4, 0.1), np.full(4, 0.3)
    data = oracles.gaussian_grid_data(np.random.default_rng(1), mu, s, 32)
    model_fn = oracles.gaussian_eps_oracle(schedule, mu, s)
    kwargs = dict(variances=("fixed_large",), num_steps=10, batch_size=32)
    exact = nll.nll_bpd_by_variance(model_fn, schedule, data, jax.random.key(0), **kwargs)["fixed_large"]
    tanh = nll.nll_bpd_by_variance(model_fn, schedule, data, jax.random.key(0), cdf="tanh", **kwargs)["fixed_large"]
    np.testing.assert_array_equal(exact["terms"][1:], tanh["terms"][1:])
    np.testing.assert_array_equal(exact["prior"], tanh["prior"])
    assert exact["terms"][0] != tanh["terms"][0]
    with pytest.raises(ValueError, match="cdf must be one of"):
        losses.bpd_terms(model_fn, schedule, jnp.asarray(data), jax.random.key(0), cdf="logistic")
