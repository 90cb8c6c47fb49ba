"""Tests for ddpm_jax/diffusion.py, the σ_t records of ddpm_jax/variances.py, and the Gaussian oracles (tests/oracles.py).

Every float32 result is compared with a float64 NumPy formula written from the
paper, within a float32 error budget scaled by the size of the terms that are
summed; the posterior and the oracles are also checked by Monte Carlo.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_jax import diffusion, schedules, variances
import oracles

EPS32 = 1e-5  # float32 budget, relative to the sum of magnitudes of the terms


@functools.lru_cache(maxsize=None)
def _chain(name):
    """A few chains that stress the math: β ≈ 0.999, zero terminal SNR, sub-chains, a 1-step chain."""
    get = schedules.get_schedule
    return {
        "linear": lambda: get("linear", 1000),
        "cosine": lambda: get("cosine", 1000),
        "quadratic": lambda: get("quadratic", 200),
        "sigmoid": lambda: get("sigmoid", 50),
        "cosine_zero_snr": lambda: get("cosine", 100, zero_terminal_snr=True),
        "linear_zero_snr": lambda: get("linear", 1000, zero_terminal_snr=True),
        "cosine_quad10": lambda: schedules.respace(_chain("cosine"), schedules.space_timesteps(1000, 10, "quad")),
        "linear_even25": lambda: schedules.respace(_chain("linear"), schedules.space_timesteps(1000, 25, "even")),
        "one_step": lambda: schedules.respace(_chain("linear"), [0]),
        "custom": lambda: get("custom", 4, betas=[0.3, 0.6, 0.9, 0.999]),
    }[name]()


# The full chain each respaced one came from (the 'full_chain' decoder convention reads its β̃_2).
FULL = {"cosine_quad10": "cosine", "linear_even25": "linear", "one_step": "linear"}


def _host_chain(name):
    """variances.chain of a named chain, given its full chain when it is respaced."""
    if name not in FULL:
        return variances.chain(_chain(name))
    return variances.chain(_chain(FULL[name]), np.asarray(_chain(name).timesteps))


def _full_stats(name, gamma):
    """{'gamma': Γ over the FULL chain [T]} holding `gamma` [K] at the chain's steps, NaN elsewhere."""
    full = np.full(_chain(FULL.get(name, name)).num_timesteps, np.nan)
    full[np.asarray(_chain(name).timesteps)] = gamma
    return {"gamma": full}


def _log_variance(record, name, t, shape, var_out=None, gamma=None, decoder=None):
    """log σ_t² of a σ record on a named chain for a batch t, as the sampler and the bound read it."""
    resolved = variances.resolve(record, _host_chain(name), None if gamma is None else _full_stats(name, gamma),
                                 decoder=decoder)
    log_var = None if resolved.log_variance is None else jnp.asarray(resolved.log_variance)
    return variances.batch_log_variance(resolved.network, log_var, _chain(name), var_out, t, shape)


CHAINS = ("linear", "cosine", "quadratic", "sigmoid", "cosine_zero_snr", "linear_zero_snr",
          "cosine_quad10", "linear_even25", "one_step", "custom")  # fmt: skip
SHAPES = ((3,), (3, 5), (2, 4, 4, 3))


def _reference(schedule, reference_fields):
    """Float64 fields of `schedule` from its own per-step α (1 − β where β < ½, else the stored α)."""
    betas = np.asarray(schedule.betas, np.float64)
    alphas = np.where(betas < 0.5, 1 - betas, np.asarray(schedule.alphas, np.float64))
    return reference_fields(1 - alphas)


def _at(values, t, shape):
    return np.asarray(values, np.float64)[np.asarray(t)].reshape((-1,) + (1,) * (len(shape) - 1))


def _close(actual, desired, scale, tol=EPS32, what=""):
    actual = np.asarray(actual, np.float64)
    err = np.abs(actual - desired) / (tol * np.asarray(scale) + 1e-30)
    assert np.all(np.isfinite(actual)) and np.max(err) <= 1.0, f"{what}: error {np.max(err):.3g} x budget"


@st.composite
def cases(draw):
    """(chain name, t [B] with 0 and K−1 likely, seed, shape) for one of SHAPES."""
    name = draw(st.sampled_from(CHAINS))
    K = _chain(name).num_timesteps
    shape = draw(st.sampled_from(SHAPES))
    step = st.one_of(st.just(0), st.just(K - 1), st.integers(0, K - 1))
    t = draw(st.lists(step, min_size=shape[0], max_size=shape[0]))
    return name, t, draw(st.integers(0, 2**16)), shape


def _small_log_var(schedule, t, x):
    """log β̃_t (clipped at t = 1) read at t: a σ² for p_mean_variance where only its mean is tested."""
    return diffusion.extract(schedule.posterior_log_variance_clipped, t, x.shape)


def _unpack(case):
    """(schedule, t, x0 ~ U[−1, 1], ε ~ N(0, I)) from a drawn case."""
    name, t, seed, shape = case
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
    eps = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return _chain(name), jnp.asarray(t, jnp.int32), x0, eps


# --------------------------------------------------------------------------
# The posterior q(x_{t−1}|x_t, x_0), by Monte Carlo.


@pytest.mark.parametrize("name, t", [("linear", 0), ("linear", 1), ("linear", 10), ("linear", 500), ("linear", 999),
                                     ("cosine", 999), ("cosine_quad10", 5), ("linear_zero_snr", 999)])  # fmt: skip
def test_posterior_is_the_regression_of_x_prev_on_x_t(name, t, reference_fields):
    """x_0 fixed, x_{t−1} ~ q(x_{t−1}|x_0), x_t ~ q(x_t|x_{t−1}): regress x_{t−1} on x_t (2·10⁶ samples)."""
    schedule = _chain(name)
    ref = _reference(schedule, reference_fields)
    n, x0 = 2_000_000, 0.8
    rng = np.random.default_rng(t)
    ac_prev, alpha = ref["alphas_cumprod_prev"][t], ref["alphas"][t]
    x_prev = np.sqrt(ac_prev) * x0 + np.sqrt(1 - ac_prev) * rng.standard_normal(n)
    x_t = np.sqrt(alpha) * x_prev + np.sqrt(1 - alpha) * rng.standard_normal(n)
    cov = np.cov(x_prev, x_t)
    slope = cov[0, 1] / cov[1, 1]
    intercept = x_prev.mean() - slope * x_t.mean()
    resid = cov[0, 0] - slope * cov[0, 1]
    se_slope = np.sqrt(resid / (n * cov[1, 1]))
    se_intercept = np.sqrt(resid * (1 / n + x_t.mean() ** 2 / (n * cov[1, 1])))
    z = 5.0
    assert abs(slope - schedule.posterior_mean_coef2[t]) <= z * se_slope + 1e-7
    assert abs(intercept - schedule.posterior_mean_coef1[t] * x0) <= z * se_intercept + 1e-7
    assert abs(resid - schedule.posterior_variance[t]) <= z * resid * np.sqrt(2 / n) + 1e-7
    # q_posterior is that Gaussian.
    xs = jnp.asarray([[-1.0], [0.5]], jnp.float32)
    mean, var, _ = diffusion.q_posterior(schedule, jnp.full_like(xs, x0), xs, jnp.full((2,), t, jnp.int32))
    np.testing.assert_allclose(mean, np.float32(intercept) + np.float32(slope) * xs, atol=10 * z * se_intercept + 1e-6)
    np.testing.assert_allclose(var, np.full((2, 1), schedule.posterior_variance[t]))


# --------------------------------------------------------------------------
# Forward process and parameterisations against float64.


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_forward_process_and_conversions_match_float64(case, reference_fields):
    schedule, t, x0, eps = _unpack(case)
    ref = _reference(schedule, reference_fields)
    sa, s1 = (_at(ref[k], t, x0.shape) for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    x0_64, eps_64 = np.asarray(x0, np.float64), np.asarray(eps, np.float64)

    x_t = diffusion.q_sample(schedule, x0, t, eps)
    chex.assert_shape(x_t, x0.shape)
    chex.assert_type(x_t, jnp.float32)
    _close(x_t, sa * x0_64 + s1 * eps_64, sa * abs(x0_64) + s1 * abs(eps_64), what="x_t")
    mean, var, log_var = diffusion.q_mean_variance(schedule, x0, t)
    _close(mean, sa * x0_64, sa * abs(x0_64), what="mean")
    _close(var, s1**2 + 0 * x0_64, s1**2, what="var")
    _close(log_var, np.log(s1**2), abs(np.log(s1**2)) + 1e-30, what="log_var")

    xt = np.asarray(x_t, np.float64)
    x0_hat = diffusion.eps_to_x0(schedule, x_t, t, eps)  # seed eq. 6
    _close(x0_hat, (xt - s1 * eps_64) / sa, (abs(xt) + s1 * abs(eps_64)) / sa, what="x0_hat")
    eps_hat = diffusion.x0_to_eps(schedule, x_t, t, x0)
    _close(eps_hat, (xt - sa * x0_64) / s1, (abs(xt) + sa * abs(x0_64)) / s1 * 2, what="eps_hat")

    v = diffusion.x0_eps_to_v(schedule, x0, t, eps)  # Salimans & Ho: v = √ᾱ ε − √(1 − ᾱ) x_0
    _close(v, sa * eps_64 - s1 * x0_64, sa * abs(eps_64) + s1 * abs(x0_64), what="v")
    scale = abs(xt) + abs(np.asarray(v, np.float64))
    _close(diffusion.v_to_x0(schedule, x_t, t, v), x0_64, 2 * scale, what="v_to_x0")
    _close(diffusion.v_to_eps(schedule, x_t, t, v), eps_64, 2 * scale, what="v_to_eps")


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_eps_to_mean_is_ho_eq11_and_the_posterior_mean_at_x0_hat(case, reference_fields):
    schedule, t, x0, eps = _unpack(case)
    ref = _reference(schedule, reference_fields)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    eps_model = eps + 0.1  # any network output, not the true noise
    xt, e = np.asarray(x_t, np.float64), np.asarray(eps_model, np.float64)
    beta, alpha, s1 = (_at(ref[k], t, x0.shape) for k in ("betas", "alphas", "sqrt_one_minus_alphas_cumprod"))
    ho_eq11 = (xt - beta / s1 * e) / np.sqrt(alpha)  # Algorithm 2's mean
    scale = (abs(xt) + beta / s1 * abs(e)) / np.sqrt(alpha)
    mean = diffusion.eps_to_mean(schedule, x_t, t, eps_model)
    chex.assert_shape(mean, x0.shape)
    _close(mean, ho_eq11, scale, what="mean")
    # μ̃_t(x_t, x̂_0(ε)): the same mean through the posterior, as p_mean_variance computes it.
    c1, c2, rs, rm = (_at(ref[k], t, x0.shape) for k in (
        "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))
    p_mean = diffusion.p_mean_variance(schedule, eps_model, x_t, t, _small_log_var(schedule, t, x_t))["mean"]
    _close(p_mean, ho_eq11, scale + c1 * (rs * abs(xt) + rm * abs(e)) + c2 * abs(xt), what="p_mean")


@settings(max_examples=20, deadline=None)
@given(case=cases())
def test_mean_types_give_the_same_mean(case):
    schedule, t, x0, eps = _unpack(case)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    outputs = {"eps": eps, "x0": x0, "v": diffusion.x0_eps_to_v(schedule, x0, t, eps)}
    log_var = _small_log_var(schedule, t, x_t)
    means = {k: diffusion.p_mean_variance(schedule, o, x_t, t, log_var, mean_type=k) for k, o in outputs.items()}
    expected, _, _ = diffusion.q_posterior(schedule, x0, x_t, t)
    scale = np.abs(np.asarray(expected)) + np.abs(np.asarray(x_t)) + 1e-3
    for k, out in means.items():
        # ε → x̂_0 divides by √ᾱ_t, so the ε form is only as accurate as 1/√ᾱ_t allows.
        amp = 1.0 if k != "eps" else _at(schedule.sqrt_recip_alphas_cumprod, t, x0.shape)
        _close(out["mean"], np.asarray(expected, np.float64), scale * amp, tol=1e-4, what=k)
    clipped = diffusion.p_mean_variance(schedule, 3.0 * x0, x_t, t, log_var, mean_type="x0", clip_x0=True)
    np.testing.assert_array_equal(clipped["pred_x0"], jnp.clip(3.0 * x0, -1, 1))


def test_jit_matches_eager():
    name = "cosine_quad10"
    schedule = _chain(name)
    rng = np.random.default_rng(0)
    x0, eps = (jnp.asarray(rng.standard_normal((4, 3, 3, 2)), jnp.float32) for _ in range(2))
    t = jnp.asarray([0, 3, 8, 9], jnp.int32)
    stats = _full_stats(name, np.linspace(0.2, 0.9, 10))
    c = _host_chain(name)

    def p_mean_variance(s, record, log_var_K):  # every σ record as the sampler reads it, in the traced code
        output = jnp.concatenate([x0, jnp.tanh(eps)], -1) if record.from_network else x0
        mean_out, var_out = diffusion.split_model_output(output, record.from_network)
        log_var = variances.batch_log_variance(record.network, log_var_K, s, var_out, t, eps.shape)
        return diffusion.p_mean_variance(s, mean_out, eps, t, log_var)

    functions = {
        "q_sample": lambda s: diffusion.q_sample(s, x0, t, eps),
        "q_posterior": lambda s: diffusion.q_posterior(s, x0, eps, t),
        "eps_to_mean": lambda s: diffusion.eps_to_mean(s, eps, t, x0),
    }
    for key, record in variances.VARIANCES.items():
        resolved = variances.resolve(record, c, stats)
        log_var_K = None if resolved.log_variance is None else jnp.asarray(resolved.log_variance)
        functions[key] = functools.partial(p_mean_variance, record=record, log_var_K=log_var_K)
    for key, fn in functions.items():
        chex.assert_trees_all_close(jax.jit(fn)(schedule), fn(schedule), rtol=1e-6, atol=1e-6, custom_message=key)


# --------------------------------------------------------------------------
# The reverse variance σ_t², every choice by name.


def _analytic_reference(ref, gamma):
    """Analytic-DPM Thm. 1 with λ² = β̃ simplifies to σ² = β̃_t + β_t²/(α_t(1 − ᾱ_t))·(1 − Γ_t);
    Thm. 2's upper bound λ² + c_t² has c_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t), the posterior's x_0 coefficient."""
    lam2 = ref["posterior_variance"]
    upper = lam2 + ref["posterior_mean_coef1"] ** 2
    gap2 = ref["betas"] ** 2 / (ref["alphas"] * (1 - ref["alphas_cumprod"]))
    return np.clip(lam2 + gap2 * (1 - np.clip(gamma, 0, 1)), lam2, upper), lam2, upper, gap2


# (record, decoder-step convention): each record with its default, and the analytic σ under every convention.
VARIANCE_CASES = [(v, None) for v in sorted(variances.VARIANCES)] + [("analytic", d) for d in sorted(variances.DECODERS)]


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("variance, decoder", VARIANCE_CASES)
def test_every_variance_matches_float64(name, variance, decoder, reference_fields):
    schedule = _chain(name)
    ref = _reference(schedule, reference_fields)
    full_ref = _reference(_chain(FULL.get(name, name)), reference_fields)
    K = schedule.num_timesteps
    t = jnp.arange(K, dtype=jnp.int32)
    x_t = jnp.zeros((K, 2), jnp.float32)
    u = np.linspace(-1, 1, K)  # the learned output, per step
    var_out = np.stack([u, -u], -1).astype(np.float32)
    gamma = np.linspace(0.0, 1.0, K)
    record = variances.VARIANCES[variance]
    output = jnp.concatenate([x_t, var_out], -1) if record.from_network else x_t
    mean_out, var_part = diffusion.split_model_output(output, record.from_network)
    log_var = _log_variance(record, name, t, x_t.shape, var_part, gamma, decoder)
    log_var = diffusion.p_mean_variance(schedule, mean_out, x_t, t, log_var)["log_variance"]
    chex.assert_shape(log_var, (K, 2))

    sub_beta_tilde_2 = ref["posterior_variance"][1] if K > 1 else ref["betas"][0]  # β̃ at the chain's 2nd step
    clipped = np.log(sub_beta_tilde_2)
    log_tilde = np.append(clipped, np.log(ref["posterior_variance"][1:]))
    log_beta = np.append(clipped, np.log(ref["betas"][1:]))
    if variance == "fixed_small":
        expected = log_tilde[:, None]
    elif variance == "fixed_large":
        expected = log_beta[:, None]
    elif variance == "learned":
        expected = var_out
    elif variance == "learned_range":  # N&D eq. 15 with v = (output + 1)/2
        frac = (var_out + 1) / 2
        expected = frac * np.log(ref["betas"])[:, None] + (1 - frac) * log_tilde[:, None]
    else:
        sigma2 = _analytic_reference(ref, gamma)[0]
        # The decoder step t = 1: the full T-step chain's β̃_2 (the default), the sub-chain's, or the
        # sub-chain's as a floor under the record's own value (this codebase before 2026-12).
        decoder = decoder or "full_chain"
        sigma2[0] = {"full_chain": full_ref["posterior_variance"][1], "sub_chain": sub_beta_tilde_2,
                     "floor_sub_chain": max(sigma2[0], sub_beta_tilde_2)}[decoder]
        expected = np.log(sigma2)[:, None]
    np.testing.assert_allclose(log_var, np.broadcast_to(expected, (K, 2)), rtol=2e-5, atol=2e-6)


def test_fixed_variances_keep_their_old_float32_values():
    """fixed_large/fixed_small resolved on the host equal, bit for bit, the float32 schedule fields
    they were read from before σ became data (log β̃ clipped at t = 1; log β_t with log β̃_2 at t = 1)."""
    for name in CHAINS:
        schedule, c = _chain(name), _host_chain(name)
        small = variances.resolve("fixed_small", c).log_variance
        large = variances.resolve("fixed_large", c).log_variance
        np.testing.assert_array_equal(small, np.asarray(schedule.posterior_log_variance_clipped), err_msg=name)
        np.testing.assert_array_equal(large[1:], np.asarray(schedule.log_betas)[1:], err_msg=name)
        np.testing.assert_array_equal(large[:1], small[:1], err_msg=name)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(CHAINS), seed=st.integers(0, 2**16))
def test_analytic_variance_within_thm2_bounds(name, seed, reference_fields):
    schedule = _chain(name)
    K = schedule.num_timesteps
    ref = _reference(schedule, reference_fields)
    c = _host_chain(name)
    gamma = np.random.default_rng(seed).uniform(-0.5, 1.5, K)  # clipped to [0, 1] by the code
    sigma2 = variances.analytic_variance(c, gamma)
    assert sigma2.dtype == np.float64 and sigma2.shape == (K,)
    expected, lower, upper, gap2 = _analytic_reference(ref, gamma)
    np.testing.assert_allclose(sigma2, expected, rtol=2e-5)
    # Thm. 2's bounds, from the chain's float64 λ² = β̃ and c_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t).
    lo, hi = c.posterior_variance, c.posterior_variance + c.posterior_mean_coef1**2
    np.testing.assert_allclose(lo, lower, rtol=1e-6)
    np.testing.assert_allclose(hi, upper, rtol=2e-5)
    assert np.all(sigma2 >= lower * (1 - 1e-6)) and np.all(sigma2 <= upper * (1 + 2e-5))
    # Γ = 1: the lower bound λ² = β̃. Γ = 0: λ² + gap², unclipped wherever SNR_t = ᾱ_t/(1 − ᾱ_t) >= 1.
    at_one = variances.analytic_variance(c, np.ones(K))
    np.testing.assert_allclose(at_one, lower, rtol=1e-6)
    at_zero = variances.analytic_variance(c, np.zeros(K))
    snr_high = ref["alphas_cumprod"] >= 1 - ref["alphas_cumprod"]
    np.testing.assert_allclose(at_zero[snr_high], (lower + gap2)[snr_high], rtol=2e-5)
    np.testing.assert_allclose(at_zero, np.minimum(lower + gap2, upper), rtol=2e-5)


@settings(max_examples=20, deadline=None)
@given(
    chain=st.one_of(  # a name of CHAINS, or any custom β's (built in the test, not while generating)
        st.sampled_from(CHAINS),
        st.sampled_from([1, 2, 30]).flatmap(lambda k: st.lists(st.floats(1e-6, 0.999), min_size=k, max_size=k)),
    ),
    variance=st.sampled_from(sorted(variances.VARIANCES)),
    mean_type=st.sampled_from(diffusion.MEAN_TYPES),
    clip_x0=st.booleans(),
)
def test_no_nan_or_inf_anywhere(chain, variance, mean_type, clip_x0):
    if isinstance(chain, str):
        schedule, c = _chain(chain), _host_chain(chain)
        T = _chain(FULL.get(chain, chain)).num_timesteps
    else:
        schedule = schedules.get_schedule("custom", len(chain), betas=chain)
        c, T = variances.chain(schedule), len(chain)
    K = schedule.num_timesteps
    t = jnp.arange(K, dtype=jnp.int32)
    rng = np.random.default_rng(K)
    x_t = jnp.asarray(rng.standard_normal((K, 3)), jnp.float32)
    out = jnp.asarray(rng.standard_normal((K, 3)), jnp.float32)
    record = variances.VARIANCES[variance]
    # A lone custom 1-step chain has no full-chain β̃_2, so 'full_chain' (analytic's default) refuses it.
    decoder = None if c.full_beta_tilde_2 is not None else "sub_chain"
    resolved = variances.resolve(record, c, {"gamma": rng.uniform(0, 1, T)}, decoder=decoder)
    log_var_K = None if resolved.log_variance is None else jnp.asarray(resolved.log_variance)
    log_var = variances.batch_log_variance(record.network, log_var_K, schedule, jnp.tanh(out), t, x_t.shape)
    p = diffusion.p_mean_variance(schedule, out, x_t, t, log_var, mean_type=mean_type, clip_x0=clip_x0)
    for key, value in p.items():
        chex.assert_shape(value, (K, 3))
        assert np.all(np.isfinite(value)), key
    assert np.all(np.isfinite(diffusion.eps_to_mean(schedule, x_t, t, out)))


def test_bad_choices_name_the_field():
    schedule, x = _chain("linear"), jnp.zeros((2, 3))
    t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="variance must be one of"):
        variances.get("large")
    with pytest.raises(ValueError, match="needs stats \\['gamma'\\]"):
        variances.resolve("analytic", variances.chain(schedule))
    with pytest.raises(ValueError, match="decoder must be one of"):
        variances.resolve("fixed_small", variances.chain(schedule), decoder="middle")
    with pytest.raises(ValueError, match="mean_type"):
        diffusion.p_mean_variance(schedule, x, x, t, _small_log_var(schedule, t, x), mean_type="score")


# --------------------------------------------------------------------------
# check_t: the step index of q_sample, q_mean_variance and q_posterior.


@pytest.mark.parametrize("bad, match", [
    (jnp.asarray([0, 1000], jnp.int32), "\\[0, 999\\]"),  # t = T
    (jnp.asarray([-1, 3], jnp.int32), "\\[0, 999\\]"),  # t = −1
    (np.asarray([1, 5000], np.int64), "\\[0, 999\\]"),  # NumPy ints are checked too
    (jnp.asarray([1.0, 2.0], jnp.float32), "integer"),  # a float t is refused, not truncated
    (jnp.asarray([1, 2, 3], jnp.int32), "shape \\[B\\]"),  # one step per example: B = 2
    (jnp.asarray(1, jnp.int32), "shape \\[B\\]"),  # a scalar is not [B]
])  # fmt: skip
def test_q_functions_refuse_a_bad_t_and_name_it(bad, match):
    schedule = _chain("linear")
    x = jnp.zeros((2, 3), jnp.float32)
    calls = {
        "q_sample": lambda: diffusion.q_sample(schedule, x, bad, x),
        "q_mean_variance": lambda: diffusion.q_mean_variance(schedule, x, bad),
        "q_posterior": lambda: diffusion.q_posterior(schedule, x, x, bad),
    }
    for key, call in calls.items():
        with pytest.raises(ValueError, match=f"^t must .*{match}"):
            call()


def test_check_t_accepts_every_step_and_the_range_is_the_chain_s_own():
    sub = _chain("cosine_quad10")  # K = 10: its steps are 0..9, whatever original steps they stand for
    x = jnp.ones((10, 2), jnp.float32)
    t = jnp.arange(10, dtype=jnp.int32)
    np.testing.assert_allclose(diffusion.q_sample(sub, x, t, 0 * x)[:, 0], sub.sqrt_alphas_cumprod)
    with pytest.raises(ValueError, match="\\[0, 9\\]"):
        diffusion.q_posterior(sub, x[:1], x[:1], jnp.asarray([10], jnp.int32))


def test_under_jit_a_float_or_misshaped_t_still_raises():
    schedule = _chain("linear")
    x = jnp.zeros((2, 3), jnp.float32)
    q_sample = jax.jit(lambda t: diffusion.q_sample(schedule, x, t, x))
    q_posterior = jax.jit(lambda t: diffusion.q_posterior(schedule, x, x, t))
    for fn in (q_sample, q_posterior):
        with pytest.raises(ValueError, match="^t must be an integer"):
            fn(jnp.asarray([1.0, 2.0], jnp.float32))
        with pytest.raises(ValueError, match="^t must have shape \\[B\\]"):
            fn(jnp.asarray([1, 2, 3], jnp.int32))
        fn(jnp.asarray([0, 999], jnp.int32))  # a good t traces and runs


# --------------------------------------------------------------------------
# Gaussian data x_0 ~ N(μ, diag s²): the optimal ε and the true reverse process in closed form.

MU = np.array([0.1, -0.2, 0.3])
S = np.array([0.05, 0.3, 0.8])


def _gaussian_chain(rng, ac_prev, alpha, n):
    """(x_{t−1}, x_t) samples [n, 3], float64."""
    x0 = MU + S * rng.standard_normal((n, 3))
    x_prev = np.sqrt(ac_prev) * x0 + np.sqrt(1 - ac_prev) * rng.standard_normal((n, 3))
    return x_prev, np.sqrt(alpha) * x_prev + np.sqrt(1 - alpha) * rng.standard_normal((n, 3))


def _regress(y, x):
    """Per-column least squares y ≈ a + b x: (a, b, residual variance, standard errors of a and b)."""
    n = len(x)
    mx, my = x.mean(0), y.mean(0)
    vx = ((x - mx) ** 2).mean(0)
    b = ((x - mx) * (y - my)).mean(0) / vx
    a = my - b * mx
    r = ((y - a - b * x) ** 2).mean(0)
    return a, b, r, np.sqrt(r * (1 / n + mx**2 / (n * vx))), np.sqrt(r / (n * vx))


@pytest.mark.parametrize("t", [0, 100, 600, 999])
def test_oracle_is_the_regression_of_eps_on_x_t(t):
    schedule = _chain("linear")
    ac = float(np.asarray(schedule.alphas_cumprod, np.float64)[t])
    rng = np.random.default_rng(t)
    n = 1_000_000
    x0 = MU + S * rng.standard_normal((n, 3))
    eps = rng.standard_normal((n, 3))
    x_t = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * eps
    a, b, _, se_a, se_b = _regress(eps, x_t)
    model = oracles.gaussian_eps_oracle(schedule, MU, S)
    at = np.asarray(model(jnp.asarray([[0.0] * 3, [1.0] * 3], jnp.float32), jnp.full((2,), t, jnp.int32)), np.float64)
    assert np.all(abs(at[0] - a) <= 5 * se_a + 1e-6)
    assert np.all(abs(at[1] - at[0] - b) <= 5 * se_b + 1e-6)
    # Γ_t = E||ε*||²/d.
    eps_star = at[0] + (at[1] - at[0]) * x_t[:100_000]
    norms = np.mean(eps_star**2, axis=1)
    gamma = oracles.gaussian_gamma(schedule, S)[t]
    assert abs(norms.mean() - gamma) <= 5 * norms.std() / np.sqrt(len(norms)) + 1e-6


@pytest.mark.parametrize("name, t", [("linear", 0), ("linear", 300), ("cosine_quad10", 1), ("cosine_quad10", 7)])
def test_reverse_moments_are_the_regression_of_x_prev_on_x_t(name, t):
    schedule = _chain(name)
    ac_prev = float(np.asarray(schedule.alphas_cumprod_prev, np.float64)[t])
    alpha = float(np.asarray(schedule.alphas, np.float64)[t])
    x_prev, x_t = _gaussian_chain(np.random.default_rng(t), ac_prev, alpha, 1_000_000)
    a, b, r, se_a, se_b = _regress(x_prev, x_t)
    probe = np.array([[0.0] * 3, [1.0] * 3])
    mean, var = oracles.gaussian_reverse_moments(schedule, MU, S, probe, np.array([t, t]))
    assert np.all(abs(mean[0] - a) <= 5 * se_a + 1e-9)
    assert np.all(abs(mean[1] - mean[0] - b) <= 5 * se_b + 1e-9)
    assert np.all(abs(var[0] - r) <= 5 * r * np.sqrt(2 / len(x_t)) + 1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_quad10", "linear_even25"])
def test_optimal_eps_gives_the_exact_reverse_mean_and_analytic_variance(name):
    """μ̃ is linear in x_0, so μ_θ(x_t) with ε* = E[ε|x_t] is E[x_{t−1}|x_t] exactly; and
    Analytic-DPM's σ² with the exact Γ is the dimension-averaged Var[x_{t−1}|x_t] exactly."""
    chain = _chain(name)
    full = _chain(name.split("_")[0])
    K = chain.num_timesteps
    t = jnp.arange(K, dtype=jnp.int32)
    ac = np.asarray(chain.alphas_cumprod, np.float64)[:, None]
    rng = np.random.default_rng(1)
    x_t = jnp.asarray(np.sqrt(ac) * MU + np.sqrt(ac * S**2 + 1 - ac) * rng.standard_normal((K, 3)), jnp.float32)
    eps = oracles.gaussian_eps_oracle(full, MU, S)(x_t, chain.timesteps)  # the model sees original steps
    gamma = oracles.gaussian_gamma(chain, S)
    np.testing.assert_allclose(gamma, oracles.gaussian_gamma(full, S)[np.asarray(chain.timesteps)], rtol=1e-12)
    stats = {"gamma": oracles.gaussian_gamma(full, S)}  # over the full chain, read at the kept steps
    c = variances.chain(full, np.asarray(chain.timesteps))
    resolved = variances.resolve("analytic", c, stats)
    p = diffusion.p_mean_variance(chain, eps, x_t, t, diffusion.extract(jnp.asarray(resolved.log_variance), t, x_t.shape))
    mean, var = oracles.gaussian_reverse_moments(chain, MU, S, x_t, np.arange(K))
    c1, rs, rm = (np.asarray(getattr(chain, k), np.float64)[:, None] for k in (
        "posterior_mean_coef1", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))
    xt = np.abs(np.asarray(x_t, np.float64))
    _close(p["mean"], mean, 3 * (c1 * (rs * xt + rm * np.abs(np.asarray(eps))) + xt + 1e-2), what="mean")
    sigma2 = variances.analytic_variance(c, gamma)
    np.testing.assert_allclose(sigma2, var.mean(axis=1), rtol=1e-4)
    # What p(x_{t−1}|x_t) uses is that σ² at every step but the decoder's (t = 1, set by its convention).
    np.testing.assert_allclose(p["variance"][1:], np.broadcast_to(var.mean(axis=1)[1:, None], (K - 1, 3)), rtol=1e-4)
    # Isotropic data: exact in every dimension.
    _, var_iso = oracles.gaussian_reverse_moments(chain, 0.1, 0.3, x_t, np.arange(K))
    sigma2_iso = variances.analytic_variance(c, oracles.gaussian_gamma(chain, 0.3))
    np.testing.assert_allclose(np.broadcast_to(sigma2_iso[:, None], var_iso.shape), var_iso, rtol=1e-4)


# --------------------------------------------------------------------------
# Clipping x̂_0: ε̂ must be recomputed from the clipped x̂_0 (improved-diffusion; Song et al. eq. 12).


def _clipping_case():
    """A chain, x_t, an ε output whose x̂_0 leaves [−1, 1] in about half the entries, z, and float64 x̂_0 clipped and ε̂."""
    schedule = schedules.get_schedule("linear", 100)
    rng = np.random.default_rng(5)
    t = jnp.asarray([3, 40, 70, 99], jnp.int32)
    x_t = jnp.asarray(rng.standard_normal((4, 3, 3, 2)) * 1.5, jnp.float32)
    eps = jnp.asarray(rng.standard_normal((4, 3, 3, 2)), jnp.float32)
    ac = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)].reshape(-1, 1, 1, 1)
    one_minus = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)[np.asarray(t)].reshape(-1, 1, 1, 1) ** 2
    x, e = np.asarray(x_t, np.float64), np.asarray(eps, np.float64)
    raw = (x - np.sqrt(one_minus) * e) / np.sqrt(ac)
    assert 0.2 < np.mean(np.abs(raw) > 1) < 0.9  # clipping is active in many entries, not all
    x0 = np.clip(raw, -1, 1)
    eps_clipped = (x - np.sqrt(ac) * x0) / np.sqrt(one_minus)
    return schedule, t, x_t, eps, x0, eps_clipped


def test_clipped_p_mean_variance_recomputes_eps_from_the_clipped_x0():
    schedule, t, x_t, eps, x0, eps_clipped = _clipping_case()
    b = np.asarray(schedule.betas, np.float64)
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    i = np.asarray(t)
    coef1 = (np.sqrt(ac_prev) * b / (1 - ac))[i].reshape(-1, 1, 1, 1)
    coef2 = ((1 - ac_prev) * np.sqrt(1 - b) / (1 - ac))[i].reshape(-1, 1, 1, 1)
    p = diffusion.p_mean_variance(schedule, eps, x_t, t, jnp.zeros((4, 1, 1, 1)), clip_x0=True)
    np.testing.assert_allclose(p["pred_x0"], x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p["pred_eps"], eps_clipped, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p["mean"], coef1 * x0 + coef2 * np.asarray(x_t, np.float64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_clipped_ddim_step_uses_the_eps_of_the_clipped_x0(eta):
    """Song et al. eq. 12 in float64: x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ²) ε̂(x̂_0) + σ z, per example's step."""
    from ddpm_jax import sampling  # pylint: disable=import-outside-toplevel

    schedule, t, x_t, eps, x0, eps_clipped = _clipping_case()
    b = np.asarray(schedule.betas, np.float64)
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    sigma2 = eta**2 * b * (1 - ac_prev) / (1 - ac)
    z = np.random.default_rng(6).standard_normal(x_t.shape)
    for j, i in enumerate(np.asarray(t)):
        out = sampling.ddim_step(schedule, eps[j:j + 1], x_t[j:j + 1], jnp.int32(i), jnp.asarray(z[j:j + 1], jnp.float32),
                                 jnp.asarray(sigma2, jnp.float32), mean_type="eps", clip_x0=True)
        want = (np.sqrt(ac_prev[i]) * x0[j] + np.sqrt(1 - ac_prev[i] - sigma2[i]) * eps_clipped[j]
                + np.sqrt(sigma2[i]) * z[j])
        np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=2e-5, err_msg=f"step {i}")
