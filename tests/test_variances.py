"""σ_t records (ddpm_jax/variances.py): every choice and convention against an independent float64 computation,
bit-identity of the old conventions, and a researcher's own σ through sampling, the bound and the ablation."""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from ddpm_jax import losses, sampling, schedules, statistics, variances
from ddpm_jax.evaluation import nll
from experiments.custom_sigma import GEOMETRIC

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = 100
SCHEDULE = schedules.get_schedule("linear", T)


def _reference(betas):
    """ᾱ, ᾱ_prev, β, β̃ of a chain in float64 from its β's (Ho et al. eqs. 4, 7), independent of the package."""
    betas = np.asarray(betas, np.float64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    return ac, ac_prev, betas, betas * (1.0 - ac_prev) / (1.0 - ac)


def _sub_betas(kept):
    ac = np.cumprod(1.0 - schedules.linear_betas(T))[kept]
    return 1.0 - ac / np.append(1.0, ac[:-1])


@pytest.mark.parametrize("kept", [np.arange(T), np.array([0, 9, 30, 64, 99]), np.array([0, 1, 50, 99])])
def test_fixed_choices_and_every_decoder_convention_match_float64(kept):
    c = variances.chain(SCHEDULE, kept)
    _, _, beta, beta_tilde = _reference(_sub_betas(kept))
    full_beta_tilde_2 = _reference(schedules.linear_betas(T))[3][1]
    sub_beta_tilde_2 = beta_tilde[1]
    expected_first = {"full_chain": full_beta_tilde_2, "sub_chain": sub_beta_tilde_2}
    for decoder, first in expected_first.items():
        for name, sigma2 in (("fixed_large", beta), ("fixed_small", beta_tilde)):
            r = variances.resolve(name, c, decoder=decoder)
            want = np.concatenate([[first], sigma2[1:]])
            np.testing.assert_allclose(r.variance, want, rtol=2e-6, err_msg=f"{name} {decoder}")
            np.testing.assert_allclose(r.log_variance, np.log(want), rtol=2e-6, atol=1e-6)
    floored = variances.resolve("fixed_large", c, decoder="floor_sub_chain")
    np.testing.assert_allclose(floored.variance[0], max(beta[0], sub_beta_tilde_2), rtol=2e-6)


def test_old_conventions_are_bit_identical_to_the_stored_schedule_fields():
    """Before records, fixed_large read [log β̃_2, log β_2..] and fixed_small log β̃ (clipped) from the Schedule."""
    for kept in (np.arange(T), schedules.space_timesteps(T, 7)):
        sub = schedules.respace(SCHEDULE, kept) if len(kept) < T else SCHEDULE
        c = variances.chain(SCHEDULE, kept)
        large = variances.resolve("fixed_large", c, decoder="sub_chain").log_variance
        small = variances.resolve("fixed_small", c, decoder="sub_chain").log_variance
        old_large = np.concatenate([np.asarray(sub.posterior_log_variance_clipped[:1]), np.asarray(sub.log_betas[1:])])
        np.testing.assert_array_equal(large, old_large)
        np.testing.assert_array_equal(small, np.asarray(sub.posterior_log_variance_clipped))


def test_analytic_matches_bao_et_al_thm1_in_float64_and_its_decoder_conventions():
    kept = np.array([0, 9, 30, 64, 99])
    gamma = np.linspace(0.05, 0.999, T)
    ac, ac_prev, beta, beta_tilde = _reference(_sub_betas(kept))
    alpha = 1.0 - beta
    # Thm. 1 with λ² = β̃, written with the difference of square roots as in the paper.
    gap = np.sqrt((1.0 - ac) / alpha) - np.sqrt(np.maximum(1.0 - ac_prev - beta_tilde, 0.0))
    sigma2 = beta_tilde + gap**2 * (1.0 - gamma[kept])
    coef1 = np.sqrt(ac_prev) * beta / (1.0 - ac)
    sigma2 = np.clip(sigma2, beta_tilde, beta_tilde + coef1**2)  # Thm. 2 for data in [-1, 1]
    c = variances.chain(SCHEDULE, kept)
    r = variances.resolve("analytic", c, {"gamma": gamma})
    assert r.decoder == "full_chain"  # Analytic-DPM's code: σ_1² = β̃_2 of the full chain
    full_beta_tilde_2 = _reference(schedules.linear_betas(T))[3][1]
    np.testing.assert_allclose(r.variance, np.concatenate([[full_beta_tilde_2], sigma2[1:]]), rtol=1e-5)
    floor = variances.resolve("analytic", c, {"gamma": gamma}, decoder="floor_sub_chain")
    np.testing.assert_allclose(floor.variance[0], max(sigma2[0], beta_tilde[1]), rtol=1e-5)
    assert floor.variance[0] > r.variance[0]  # the old floor is not Analytic-DPM's value


def test_analytic_without_its_statistic_or_with_a_wrong_one_names_it():
    c = variances.chain(SCHEDULE)
    with pytest.raises(ValueError, match="needs stats \\['gamma'\\]"):
        variances.resolve("analytic", c)
    with pytest.raises(ValueError, match="stats\\['gamma'\\] must have shape \\[T\\]"):
        variances.resolve("analytic", c, {"gamma": np.ones(10)})
    gamma = np.full(T, np.nan)
    with pytest.raises(ValueError, match="not estimated at steps"):
        variances.resolve("analytic", c, {"gamma": gamma})


def test_ddim_variance_is_eta_squared_beta_tilde_and_uniform_spacing_is_ddims():
    kept = schedules.kept_steps(1000, 10, "uniform")
    np.testing.assert_array_equal(kept, np.arange(0, 1000, 100))  # DDIM's range(0, T, T // K): last step 900
    np.testing.assert_array_equal(schedules.kept_steps(1000, 30, "uniform"), np.arange(0, 1000, 33)[:30])
    c = variances.chain(SCHEDULE, np.array([0, 20, 99]))
    beta_tilde = _reference(_sub_betas([0, 20, 99]))[3]
    r = variances.resolve(variances.ddim(0.3), c)
    np.testing.assert_allclose(r.variance, 0.09 * beta_tilde, rtol=2e-6, atol=0)
    assert r.variance[0] == 0.0  # DDIM's last step is x̂_0, no decoder variance when sampling


def test_sigma_clipping_on_the_last_noisy_steps_follows_analytic_dpm():
    c = variances.chain(schedules.get_schedule("linear", 1000), schedules.kept_steps(1000, 10))
    plain = variances.resolve("fixed_large", c).variance
    clipped = variances.resolve("fixed_large", c, clip_steps=1, clip_pixel=2.0).variance
    threshold = (2 * 2.0 / 255.0 * math.sqrt(math.pi / 2.0)) ** 2  # reverse_ddpm.py: (clip_pixel·2/255·√(π/2))²
    assert plain[1] > threshold  # the step from t = 111 is clipped ...
    np.testing.assert_allclose(clipped[1], threshold, rtol=1e-6)
    np.testing.assert_array_equal(clipped[[0, *range(2, 10)]], plain[[0, *range(2, 10)]])  # ... and no other


def test_get_accepts_records_names_and_module_references_and_names_bad_input():
    assert variances.get("fixed_large") is variances.FIXED_LARGE
    assert variances.get("ddim_eta0.5").ddim_eta == 0.5
    assert variances.get("experiments.custom_sigma:GEOMETRIC") is GEOMETRIC
    assert variances.get(str(ROOT / "experiments" / "custom_sigma.py") + ":GEOMETRIC").name == "geometric"
    for bad, match in (("fixed_medium", "variance must be one of"), ("ddim_eta2", "η must be a float in"),
                       ("experiments.custom_sigma:NOPE", "has no attribute"), (3, "variance must be")):
        with pytest.raises(ValueError, match=match):
            variances.get(bad)
    with pytest.raises(ValueError, match="exactly one of variance= and network="):
        variances.check(variances.Variance("neither"))


# --------------------------------------------------------------------------
# A new record and a researcher's own σ end to end.


def test_readme_example_is_the_custom_sigma_file():
    """The README's 'Your own σ_t' block is experiments/custom_sigma.py's code, line for line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Your own σ_t.*?```python\n(.*?)```", readme, re.S).group(1)
    source = (ROOT / "experiments" / "custom_sigma.py").read_text(encoding="utf-8")
    for line in block.strip().splitlines():
        if line.strip() and not line.startswith(("x = ", "bound = ", "#", "from ddpm_jax import sampling")):
            assert line in source, line


def test_own_sigma_samples_with_its_own_variance_in_float64():
    """One reverse step with GEOMETRIC adds noise of std √(√(β β̃)) exactly (Algorithm 2, line 4)."""
    mu, s = 0.3, 0.5
    model_fn = oracles.gaussian_eps_oracle(SCHEDULE, mu, s)
    batch = 4096
    x, traj = sampling.sample(model_fn, SCHEDULE, jax.random.key(3), (batch, 2), num_steps=5, variance=GEOMETRIC,
                              return_trajectory=True)
    kept = schedules.kept_steps(T, 5)
    _, _, beta, beta_tilde = _reference(_sub_betas(kept))
    sigma2 = np.sqrt(beta * beta_tilde)
    # x_{t-1} − μ_θ(x_t) is σ z with z ~ N(0, 1): compare the empirical variance at the second step.
    sub = schedules.respace(SCHEDULE, kept)
    x_t = np.asarray(traj[1], np.float64)  # after the first step (i = 4): the input of step i = 3
    t = jnp.full((batch,), 3, jnp.int32)
    eps = np.asarray(model_fn(jnp.asarray(x_t, jnp.float32), jnp.take(sub.timesteps, t)), np.float64)
    ac = np.cumprod(1.0 - _sub_betas(kept))
    mean = (x_t - beta[3] / np.sqrt(1.0 - ac[3]) * eps) / np.sqrt(1.0 - beta[3])  # Ho eq. 11
    residual = np.asarray(traj[2], np.float64) - mean
    np.testing.assert_allclose(residual.var(), sigma2[3], rtol=0.06)


def test_own_sigma_bound_equals_the_sum_of_its_gaussian_kl_terms():
    """The bound of GEOMETRIC from nll equals L_T + Σ KL(q‖N(μ, σ²)) + L_0 recomputed in float64 from the terms."""
    rng = np.random.default_rng(0)
    mu, s = np.full(4, 0.2), np.full(4, 0.3)
    data = oracles.gaussian_grid_data(rng, mu, s, 64)
    model_fn = oracles.gaussian_eps_oracle(SCHEDULE, mu, s)
    both = nll.nll_bpd_by_variance(model_fn, SCHEDULE, data, jax.random.key(1), variances=("fixed_small", GEOMETRIC),
                                   num_steps=10, batch_size=64)
    geo, small = both["geometric"], both["fixed_small"]
    # total is summed in float32 on the device, the terms here in float64
    np.testing.assert_allclose(geo["total"].mean(), geo["prior"].mean() + geo["terms"].sum(), rtol=1e-6)
    # Same x_t draws, same decoder (sub_chain for both): L_0 and the prior agree; the KL terms differ.
    np.testing.assert_allclose(geo["terms"][0], small["terms"][0], rtol=1e-6)
    np.testing.assert_array_equal(geo["prior"], small["prior"])
    assert np.all(geo["terms"][1:] != small["terms"][1:])


def test_a_data_dependent_record_estimates_and_reads_its_own_statistic():
    """A σ that needs a new statistic is one record plus its estimator: here σ² = β̃ + (β − β̃)·m_t with
    m_t = E||ε_θ||²/d estimated by a Statistic defined in the test."""
    def estimate_m(model_fn, schedule, data, rng, *, steps, batch_size, mean_type):
        return statistics.estimate_gamma(model_fn, schedule, data, rng, steps=steps, batch_size=batch_size,
                                         mean_type=mean_type)

    m_stat = statistics.Statistic("m", estimate_m)
    record = variances.Variance("mixed", lambda c, st: c.posterior_variance + (c.betas - c.posterior_variance)
                                * np.clip(st["m"], 0, 1), needs=(m_stat,))
    mu, s = np.full(4, 0.1), np.full(4, 0.4)
    model_fn = oracles.gaussian_eps_oracle(SCHEDULE, mu, s)
    data = oracles.gaussian_grid_data(np.random.default_rng(1), mu, s, 1024)
    stats = nll.estimate_stats(record.needs, model_fn, SCHEDULE, data, jax.random.key(0), batch_size=512)
    # E_ε||ε̂(x_t)||²/d for this data set in closed form (ε̂ is linear in x_t): (1 − ᾱ)(ᾱ v̂ + 1 − ᾱ)/(ᾱ s² + 1 − ᾱ)²
    # with v̂ the data's mean squared deviation from μ; only the ε draws are Monte Carlo (4096 values per t).
    ac = np.cumprod(1.0 - schedules.linear_betas(T))
    v_hat = np.mean((data.astype(np.float64) - mu) ** 2)
    expected = (1.0 - ac) * (ac * v_hat + 1.0 - ac) / (ac * s[0] ** 2 + 1.0 - ac) ** 2
    relative = np.abs(stats["m"] / expected - 1.0)
    assert relative.mean() < 0.03 and relative.max() < 0.12, (relative.mean(), relative.max())
    c = variances.chain(SCHEDULE)
    r = variances.resolve(record, c, stats)
    _, _, beta, beta_tilde = _reference(schedules.linear_betas(T))
    want = beta_tilde + (beta - beta_tilde) * np.clip(stats["m"], 0, 1)
    np.testing.assert_allclose(r.variance[1:], want[1:], rtol=2e-6)
    x = sampling.sample(model_fn, SCHEDULE, jax.random.key(0), (8, 4), num_steps=5, variance=record, stats=stats)
    assert np.all(np.isfinite(np.asarray(x)))


def test_bpd_terms_refuses_invalid_input_with_the_argument_named():
    model_fn = oracles.gaussian_eps_oracle(SCHEDULE, 0.0, 0.5)
    x0 = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="must start at step 0"):
        losses.bpd_terms(model_fn, schedules.respace(SCHEDULE, [10, 50, 99]), x0, jax.random.key(0))
    with pytest.raises(ValueError, match="x0 must be finite and lie in \\[-1, 1\\]"):
        losses.bpd_terms(model_fn, SCHEDULE, x0 + 2.0, jax.random.key(0))
    with pytest.raises(ValueError, match="model_fn output must have shape"):
        losses.bpd_terms(lambda x, t: x[:, :2], SCHEDULE, x0, jax.random.key(0))
    with pytest.raises(ValueError, match="model_fn output must have shape"):
        losses.bpd_terms(lambda x, t: x[:2], SCHEDULE, x0, jax.random.key(0))
    with pytest.raises(ValueError, match="stats\\['gamma'\\] must have shape"):
        losses.bpd_terms(model_fn, SCHEDULE, x0, jax.random.key(0), variance="analytic", stats={"gamma": np.ones(7)})
    with pytest.raises(ValueError, match="'ddim_eta0.5' is DDIM: its bound is ddim_bound"):  # q_σ, not this bound
        losses.bpd_terms(model_fn, SCHEDULE, x0, jax.random.key(0), variance="ddim_eta0.5")


@pytest.mark.parametrize("own_first", [1e-9, 0.5])
@pytest.mark.parametrize("kept", [np.arange(T), np.array([0, 9, 30, 64, 99])])
def test_every_decoder_convention_is_applied_to_a_probe_record(kept, own_first):
    """A record whose σ_1² is a probe value: 'full_chain' and 'sub_chain' replace it, 'floor_sub_chain' floors it
    (from below: 1e-9 → the floor; from above: 0.5 stays), for sampling and for the bound alike."""
    probe = variances.Variance("probe", lambda c, stats: np.append(own_first, np.full(c.num_steps - 1, 0.01)))
    c = variances.chain(SCHEDULE, kept)
    full_beta_tilde_2 = _reference(schedules.linear_betas(T))[3][1]
    sub_beta_tilde_2 = _reference(_sub_betas(kept))[3][1]
    expected = {"full_chain": full_beta_tilde_2, "sub_chain": sub_beta_tilde_2,
                "floor_sub_chain": max(own_first, sub_beta_tilde_2)}
    assert set(expected) == set(variances.DECODERS)
    for decoder, first in expected.items():
        for for_bound in (False, True):
            r = variances.resolve(probe, c, decoder=decoder, for_bound=for_bound)
            np.testing.assert_allclose(r.variance[0], first, rtol=2e-6, err_msg=decoder)
            np.testing.assert_allclose(r.variance[1:], 0.01, rtol=1e-6)
    assert variances.resolve(probe, c).decoder == "sub_chain"  # a record's default convention
