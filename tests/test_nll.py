"""Tests for ddpm_jax/evaluation/nll.py against closed forms for Gaussian data (tests/oracles.py).

For x_0 ~ N(μ, diag s²) the optimal ε-predictor E[ε|x_t] and Γ_t = E||E[ε|x_t]||²/d
are known exactly, and the entropy of the data rounded onto the 8-bit grid
lower-bounds any model's NLL, hence the variational bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import schedules, statistics
import oracles
from ddpm_jax.evaluation import nll

T = 100
MU = 0.1
S = np.linspace(0.1, 0.25, 16).reshape(4, 4, 1)  # d = 16, well inside [-1, 1]


def _schedule():
    return schedules.get_schedule("linear", T)


def _oracle(schedule):
    return oracles.gaussian_eps_oracle(schedule, MU, S)


def _data(num, seed):
    return oracles.gaussian_grid_data(np.random.default_rng(seed), MU, S, num)


def test_standard_error_matches_scipy():
    values = np.random.default_rng(0).normal(size=37)
    np.testing.assert_allclose(nll.standard_error(values), stats.sem(values), rtol=1e-12)
    assert np.isnan(nll.standard_error(np.ones(1)))


def test_estimate_gamma_matches_closed_form():
    schedule = _schedule()
    steps = [0, 10, 50, 99]
    gamma = nll.estimate_gamma(_oracle(schedule), schedule, _data(2048, seed=1), jax.random.PRNGKey(0),
                               batch_size=512, steps=steps)
    assert gamma.shape == (T,)
    assert np.all(np.isnan(np.delete(gamma, steps)))
    # Per-example ||ε||²/d has relative std ≈ √(2/16); over 2048 examples that is 0.8%.
    np.testing.assert_allclose(gamma[steps], oracles.gaussian_gamma(schedule, S)[steps], rtol=0.04)


def test_sub_chain_gamma_reads_the_kept_steps_and_refuses_unestimated_ones():
    schedule = _schedule()
    gamma = np.full(T, np.nan)
    gamma[[0, 99]] = [0.25, 0.75]
    sub = lambda steps: np.asarray(schedules.respace(schedule, steps).timesteps)  # noqa: E731
    np.testing.assert_array_equal(statistics.at_steps("gamma", gamma, sub([0, 99])), [0.25, 0.75])
    with pytest.raises(ValueError, match="not estimated at steps \\[50\\]"):
        statistics.at_steps("gamma", gamma, sub([0, 50, 99]))
    with pytest.raises(ValueError, match="shape \\[T\\]"):  # a [K] array is not the full chain's
        statistics.at_steps("gamma", gamma[[0, 99]], sub([0, 50, 99]))
    # The bound refuses the same Γ before any network call.
    with pytest.raises(ValueError, match="not estimated at steps \\[50\\]"):
        nll.nll_bpd(_oracle(schedule), schedule, _data(4, seed=4), jax.random.PRNGKey(0), variance="analytic",
                    steps=[0, 50, 99], stats={"gamma": gamma})


def test_full_chain_bound_is_above_the_data_entropy_and_tight_with_the_analytic_variance():
    schedule = _schedule()
    data = _data(512, seed=2)
    entropy = oracles.gaussian_nll_bpd(MU, S)
    for variance in ("fixed_small", "fixed_large", "analytic"):
        out = nll.nll_bpd(_oracle(schedule), schedule, data, jax.random.PRNGKey(1), variance=variance,
                          stats={"gamma": oracles.gaussian_gamma(schedule, S)}, batch_size=512)
        assert out["num_examples"] == 512 and out["terms"].shape == (T,)
        # L_T per example in float64 (KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1))), and the mean and its s.e. by NumPy/scipy.
        ac = float(np.prod(1.0 - np.asarray(schedules.linear_betas(T), np.float64)))
        x = np.asarray(data, np.float64).reshape(len(data), -1)
        prior = np.mean(0.5 * (-1.0 - np.log(1.0 - ac) + (1.0 - ac) + ac * x**2), axis=1) / np.log(2.0)
        np.testing.assert_allclose(out["prior"], prior, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(out["mean"], np.mean(np.asarray(out["total"], np.float64)), rtol=1e-6)
        np.testing.assert_allclose(out["stderr"], stats.sem(np.asarray(out["total"], np.float64)), rtol=1e-6)
        np.testing.assert_allclose(out["mean"], out["terms"].sum() + out["prior"].mean(), rtol=1e-6)
        # The bound is ≥ the NLL ≥ the entropy, up to Monte Carlo error.
        assert out["mean"] + 3.0 * out["stderr"] >= entropy, variance
    # With the exact ε and the optimal σ² the bound is nearly the entropy (measured
    # gap ≈ 0 ± 0.02); fixed σ² leave 0.14 (β) and 1.2 (β̃) bits/dim here.
    assert out["mean"] <= entropy + 0.1


def test_analytic_variance_bound_is_below_fixed_variances_at_small_k(num_steps=5):
    """Bao et al. 2022, Thm. 1: for the exact ε the analytic σ² minimises every KL term."""
    schedule = _schedule()
    data = _data(512, seed=3)
    # The same key gives the same x_t draws for every variance: paired differences.
    bounds = {
        variance: nll.nll_bpd(_oracle(schedule), schedule, data, jax.random.PRNGKey(2), variance=variance,
                              num_steps=num_steps, stats={"gamma": oracles.gaussian_gamma(schedule, S)},
                              batch_size=512)
        for variance in ("analytic", "fixed_small", "fixed_large")
    }
    for fixed in ("fixed_small", "fixed_large"):
        diff = bounds["analytic"]["total"] - bounds[fixed]["total"]
        assert diff.mean() + 3.0 * nll.standard_error(diff) < 0.0, (fixed, diff.mean())


def test_learned_range_at_its_lower_end_is_fixed_small():
    """N&D eq. 15 with v = −1 is log β̃_t: the bound of a 2C-channel model equals fixed_small's on its first C."""
    schedule = _schedule()
    oracle = _oracle(schedule)

    def learned_fn(x_t, t):  # ε in the first C channels, v = −1 in the last C
        return jnp.concatenate([oracle(x_t, t), -jnp.ones_like(x_t)], axis=-1)

    data = _data(64, seed=5)
    key = jax.random.PRNGKey(3)
    learned = nll.nll_bpd(learned_fn, schedule, data, key, variance="learned_range", num_steps=5)
    fixed = nll.nll_bpd(learned_fn, schedule, data, key, variance="fixed_small", num_steps=5)
    reference = nll.nll_bpd(oracle, schedule, data, key, variance="fixed_small", num_steps=5)
    np.testing.assert_allclose(learned["total"], reference["total"], rtol=1e-5)
    np.testing.assert_allclose(fixed["total"], reference["total"], rtol=1e-6)


def test_nll_bpd_rejects_off_grid_data_missing_gamma_and_a_respaced_schedule():
    schedule = _schedule()
    data = _data(4, seed=4)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="8-bit grid"):
        nll.nll_bpd(_oracle(schedule), schedule, data + 0.001, key, variance="fixed_small")
    with pytest.raises(ValueError, match="needs stats \\['gamma'\\]"):
        nll.nll_bpd(_oracle(schedule), schedule, data, key, variance="analytic")
    with pytest.raises(ValueError, match="full T-step chain"):
        nll.nll_bpd(_oracle(schedule), schedules.respace(schedule, [0, 50]), data, key, variance="fixed_small")


def test_one_pass_for_several_variances_equals_one_pass_each():
    """nll_bpd_by_variance shares the network calls and x_t draws; each entry must be nll_bpd's for that σ."""
    schedule = _schedule()
    oracle = _oracle(schedule)

    def learned_fn(x_t, t):  # ε in the first C channels, v = 0.3 in the last C
        return jnp.concatenate([oracle(x_t, t), jnp.full_like(x_t, 0.3)], axis=-1)

    data = _data(48, seed=6)
    key = jax.random.PRNGKey(8)
    stats = {"gamma": oracles.gaussian_gamma(schedule, S)}
    variances = ("fixed_large", "learned_range", "analytic", "fixed_small")
    together = nll.nll_bpd_by_variance(learned_fn, schedule, data, key, variances=variances, num_steps=10,
                                       stats=stats, batch_size=20)
    assert list(together) == list(variances)
    for variance in variances:
        alone = nll.nll_bpd(learned_fn, schedule, data, key, variance=variance, num_steps=10, stats=stats,
                            batch_size=20)
        np.testing.assert_allclose(together[variance]["total"], alone["total"], rtol=1e-6)
        np.testing.assert_allclose(together[variance]["terms"], alone["terms"], rtol=1e-6)
    # The choices really differ (the test would pass trivially if the variance were ignored).
    assert len({round(together[v]["mean"], 6) for v in variances}) == len(variances)


@pytest.mark.parametrize("variances,match", [((), "non-empty"), ("fixed_small", "non-empty"),
                                             (("fixed_small", "wide"), "variance must be one of"),
                                             (("fixed_small", "fixed_small"), "distinct")])
def test_nll_bpd_by_variance_names_a_bad_variance_list(variances, match):
    schedule = _schedule()
    with pytest.raises(ValueError, match=match):
        nll.nll_bpd_by_variance(_oracle(schedule), schedule, _data(4, seed=4), jax.random.PRNGKey(0),
                                variances=variances)
