"""Optimal trajectories (ddpm_jax.trajectories) against brute force and against the bound itself.

References: an exhaustive search over all trajectories (itertools.combinations) for the DP; the
exact per-step statistics of the Gaussian oracle on its data (closed forms, float64) for the
Monte Carlo estimator; and `nll.nll_bpd_by_variance(steps=...)`, the bound computed step by
step with Gaussian KLs of sampled x_t, for the closed-form pair costs.
"""

import itertools

import jax
import numpy as np
import pytest

from ddpm_jax import sampling, schedules, trajectories
from ddpm_jax.evaluation import nll

import oracles

T = 10
DIM = 8
NUM = 2048


@pytest.fixture(scope="module")
def setup():
    schedule, mu, s, data = oracles.short_chain_problem(NUM, DIM, T)
    return schedule, mu, s, data, oracles.gaussian_eps_oracle(schedule, mu, s)


def exact_statistics(schedule, mu, s, data) -> dict:
    """Γ_t and M_t of the oracle ε_θ = a_t(x_t − √ᾱ_t μ), a_t = √(1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t), averaged over
    ε exactly and over `data` empirically: ε_θ = a(√ᾱ(x_0 − μ) + √(1 − ᾱ)ε)."""
    ac = np.asarray(schedule.alphas_cumprod, np.float64)[:, None]
    one_minus = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)[:, None] ** 2
    m2 = np.mean((np.asarray(data, np.float64) - mu) ** 2, axis=0)[None, :]
    a = np.sqrt(one_minus) / (ac * s**2 + one_minus)
    gamma = np.mean(a**2 * (ac * m2 + one_minus), axis=1)
    eps_mse = np.mean((1.0 - a * np.sqrt(one_minus)) ** 2 + a**2 * ac * m2, axis=1)
    return {"gamma": gamma, "eps_mse": eps_mse}


def brute_force(F, num_steps):
    """min over every trajectory 0 < s_1 < … < T−1 of Σ F, by enumeration."""
    size = F.shape[0]
    best = (np.inf, None)
    for middle in itertools.combinations(range(1, size - 1), num_steps - 2):
        steps = (0, *middle, size - 1)
        best = min(best, (trajectories.trajectory_cost(F, steps), steps))
    return best


def test_dp_equals_brute_force_on_random_matrices():
    rng = np.random.default_rng(1)
    for _ in range(5):
        F = np.triu(rng.exponential(size=(T, T)), k=1)
        F[np.tril_indices(T)] = np.inf
        for num_steps in range(2, T + 1):
            steps = trajectories.optimal_steps(F, num_steps)
            cost, _ = brute_force(F, num_steps)
            assert len(steps) == num_steps and steps[0] == 0 and steps[-1] == T - 1 and np.all(np.diff(steps) > 0)
            np.testing.assert_allclose(trajectories.trajectory_cost(F, steps), cost, rtol=1e-12)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "analytic"])
def test_dp_equals_brute_force_on_pair_costs(setup, variance):
    schedule, mu, s, data, _ = setup
    stats = exact_statistics(schedule, mu, s, data)
    costs = trajectories.pair_costs(trajectories.full_chain(schedule), stats, variance, np.linspace(3.0, 4.0, T))
    for num_steps in (2, 3, 4, 6):
        steps = trajectories.optimal_steps(costs.matrix, num_steps)
        cost, best = brute_force(costs.matrix, num_steps)
        np.testing.assert_allclose(costs.total(steps), costs.prior + cost, rtol=1e-12)
        assert tuple(steps) == best


def test_step_statistics_match_exact_expectations(setup):
    schedule, mu, s, data, model_fn = setup
    estimated = trajectories.estimate_step_statistics(model_fn, schedule, data, jax.random.PRNGKey(2),
                                                      batch_size=1024)
    exact = exact_statistics(schedule, mu, s, data)
    for name in ("gamma", "eps_mse"):  # M·d = 16k squared Gaussians per step: ~1% Monte Carlo error
        np.testing.assert_allclose(estimated[name], exact[name], rtol=0.05, err_msg=name)
    np.testing.assert_allclose(estimated["gamma"], oracles.gaussian_gamma(schedule, s), rtol=0.05)


@pytest.mark.parametrize("variance,decoder", [("fixed_small", "sub_chain"), ("fixed_large", "sub_chain"),
                                              ("analytic", "full_chain")])
def test_dp_total_equals_the_bound_on_its_trajectory(setup, variance, decoder):
    schedule, mu, s, data, model_fn = setup
    stats = exact_statistics(schedule, mu, s, data)
    log_variances = trajectories.first_step_log_variances(schedule, variance, stats, decoder=decoder)
    decoder_nll = trajectories.estimate_decoder_nll(model_fn, schedule, data, jax.random.PRNGKey(3), log_variances,
                                                    batch_size=NUM)
    prior = float(np.mean(oracles_prior(schedule, data)))
    costs = trajectories.pair_costs(trajectories.full_chain(schedule), stats, variance, decoder_nll, prior)
    steps = trajectories.optimal_steps(costs.matrix, 4)
    bound = nll.nll_bpd_by_variance(model_fn, schedule, data, jax.random.PRNGKey(4), variances=[variance],
                                    steps=steps, stats=stats, decoder=decoder, batch_size=NUM)[variance]
    # Bound: one ε draw per example and step; prediction: exact expectations (KL) and a separate draw (L_0).
    assert abs(costs.total(steps) - bound["mean"]) < 4 * bound["stderr"], (costs.total(steps), bound)
    per_step_se = np.std(bound["total"]) / np.sqrt(NUM)
    np.testing.assert_allclose(costs.terms(steps), bound["terms"], atol=4 * per_step_se, rtol=0.03)
    np.testing.assert_allclose(bound["prior"].mean(), prior, rtol=1e-5)


def oracles_prior(schedule, data):
    """L_T per example in float64: KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1)) per dimension, in bits."""
    ac = float(np.asarray(schedule.alphas_cumprod, np.float64)[-1])
    x = np.asarray(data, np.float64)
    return np.mean(0.5 * (ac * x**2 + (1 - ac) - 1 - np.log(1 - ac)), axis=1) / np.log(2.0)


def test_estimate_pair_costs_and_sampling_accept_the_trajectory(setup):
    schedule, _, _, data, model_fn = setup
    costs, stats = trajectories.estimate_pair_costs(model_fn, schedule, data[:512], jax.random.PRNGKey(5),
                                                    "analytic", batch_size=512)
    assert set(stats) >= {"gamma", "eps_mse"} and np.all(np.isfinite(costs.matrix[np.triu_indices(T, 1)]))
    np.testing.assert_allclose(costs.prior, oracles_prior(schedule, data[:512]).mean(), rtol=1e-5)
    steps = trajectories.optimal_steps(costs.matrix, 5)
    samples = sampling.sample(model_fn, schedule, jax.random.PRNGKey(6), (4, DIM), steps=steps,
                              variance="analytic", stats=stats)
    assert samples.shape == (4, DIM) and np.all(np.isfinite(np.asarray(samples)))


def test_refuses_what_has_no_closed_form():
    full = trajectories.full_chain(schedules.get_schedule("linear", T, beta_start=0.01, beta_end=0.5))
    stats = {"eps_mse": np.ones(T), "gamma": np.ones(T)}
    for variance in ("learned_range", "ddim_eta0.5"):
        with pytest.raises(ValueError, match=variance):
            trajectories.pair_costs(full, stats, variance, np.zeros(T))
    with pytest.raises(ValueError, match="num_steps"):
        trajectories.optimal_steps(np.zeros((T, T)), 1)
