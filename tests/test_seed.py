"""Every formula of the seed note checked independently: "为何 DDPM 的反传公式是那样？", a supplement to Su Jianlin's
post "生成扩散模型漫谈（三）：DDPM = 贝叶斯 + 去噪"; each equation is stated in docs/derivation.md.

The seed writes Ho et al.'s quantities as square roots (Su's notation): seed α_t = √α_t,
β_t = √β_t, ᾱ_t = √ᾱ_t, β̄_t = √(1 − ᾱ_t) in the paper's notation. Each test states
which seed equation it checks; the wrong ones are asserted wrong and their corrections
right (see docs/derivation.md, "Where the seed is wrong"). References are float64 NumPy
and scipy, written in the paper's notation.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import diffusion, schedules, variances
import oracles

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # Ho et al. §4, paper notation
STEPS = [1, 2, 10, 100, 500, 999]  # zero-based t (the paper's t + 1); t = 0 is checked where it applies


def seed_symbols(betas=BETAS):
    """The seed's α_t, β_t, ᾱ_t, β̄_t and their t − 1 versions, float64 [T], from the paper's β."""
    alpha = 1 - betas
    abar = np.sqrt(np.cumprod(alpha))  # seed ᾱ_t = ∏ seed α_i = √(paper ᾱ_t)
    bbar = np.sqrt(1 - abar**2)  # seed β̄_t = √(1 − seed ᾱ_t²)
    return dict(a=np.sqrt(alpha), b=np.sqrt(betas), abar=abar, bbar=bbar,
                abar_prev=np.append(1.0, abar[:-1]), bbar_prev=np.append(0.0, bbar[:-1]))  # fmt: skip


def paper_posterior(t, x0, x_t, betas=BETAS):
    """Ho et al. eqs. 6–7 in the paper's notation: (μ̃_t(x_t, x_0), β̃_t)."""
    alpha = 1 - betas
    ac = np.cumprod(alpha)
    ac_prev = np.append(1.0, ac[:-1])[t]
    mean = np.sqrt(ac_prev) * betas[t] / (1 - ac[t]) * x0 + np.sqrt(alpha[t]) * (1 - ac_prev) / (1 - ac[t]) * x_t
    return mean, (1 - ac_prev) / (1 - ac[t]) * betas[t]


def seed_eq3(x_prev, x_t, x0, t, s):
    """Seed eq. (3) exactly as written: the exponent with the ½ dropped."""
    return (-((x_t - s["a"][t] * x_prev) ** 2) / s["b"][t] ** 2
            - (x_prev - s["abar_prev"][t] * x0) ** 2 / s["bbar_prev"][t] ** 2
            + (x_t - s["abar"][t] * x0) ** 2 / s["bbar"][t] ** 2)  # fmt: skip


def seed_eq4_coefficients(x_t, x0, t, s):
    """Seed eq. (4): (A, the linear coefficient) of x_{t−1} in the exponent (3)."""
    A = -s["a"][t] ** 2 / s["b"][t] ** 2 - 1 / s["bbar_prev"][t] ** 2
    linear = 2 * (s["a"][t] / s["b"][t] ** 2 * x_t + s["abar_prev"][t] / s["bbar_prev"][t] ** 2 * x0)
    return A, linear


def seed_eq5(x_t, x0, t, s):
    """Seed eq. (5): (mean, variance) of p(x_{t−1}|x_t, x_0)."""
    a, b, bbar, abar_prev, bbar_prev = (s[k][t] for k in ("a", "b", "bbar", "abar_prev", "bbar_prev"))
    return a * bbar_prev**2 / bbar**2 * x_t + abar_prev * b**2 / bbar**2 * x0, bbar_prev**2 * b**2 / bbar**2


def seed_eq7_mean(x_t, eps, t, s):
    """Seed eq. (7): (x_t − β_t²/β̄_t ε)/α_t."""
    return (x_t - s["b"][t] ** 2 / s["bbar"][t] * eps) / s["a"][t]


def seed_multiplied_out(x_t, eps, t, reading, betas=BETAS):
    """The seed's 'multiplied out' mean α_t/√ᾱ_t x_t + β_t √ᾱ_{t−1}/β̄_t ε, its symbols read three ways:
    'seed': all in the seed's notation (so √ᾱ is the paper's ᾱ^¼); 'mixed': √ᾱ meant as the paper's √ᾱ;
    'paper': every symbol in the paper's notation (the formula copied into Ho's notation)."""
    alpha, ac = 1 - betas, np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    a, b, bbar = np.sqrt(alpha[t]), np.sqrt(betas[t]), np.sqrt(1 - ac[t])
    root = {"seed": lambda v: v**0.25, "mixed": np.sqrt, "paper": np.sqrt}[reading]
    if reading == "paper":
        a, b = alpha[t], betas[t]
    return a / root(ac[t]) * x_t + b * root(ac_prev[t]) / bbar * eps


READINGS = ("seed", "mixed", "paper")


def ho_algorithm2_mean(x_t, eps, t, betas=BETAS):
    """Ho et al. Algorithm 2 / eq. 11: (x_t − β_t/√(1 − ᾱ_t) ε)/√α_t, paper notation."""
    ac = np.cumprod(1 - betas)
    return (x_t - betas[t] / np.sqrt(1 - ac[t]) * eps) / np.sqrt(1 - betas[t])


# --------------------------------------------------------------------------
# Definitions and eqs. (1)–(2).


def test_symbol_table_and_the_beta_bar_recursion():
    """α_t² + β_t² = 1, ᾱ_t = ∏α_i, β̄_t = √(1 − ᾱ_t²), and β̄_t² = β_t² + α_t² β̄_{t−1}² (used in (5), (7))."""
    s = seed_symbols()
    ac = np.cumprod(1 - BETAS)
    np.testing.assert_allclose(s["a"] ** 2 + s["b"] ** 2, 1, rtol=1e-15)
    np.testing.assert_allclose(s["abar"] ** 2, ac, rtol=1e-12)  # seed ᾱ² = paper ᾱ
    np.testing.assert_allclose(s["bbar"] ** 2, 1 - ac, rtol=1e-12)  # seed β̄² = 1 − paper ᾱ
    np.testing.assert_allclose(s["bbar"] ** 2, s["b"] ** 2 + s["a"] ** 2 * s["bbar_prev"] ** 2, rtol=1e-10)
    assert np.argmax(ac < 0.1) == 475  # where docs/derivation.md §3.3 says the x_t coefficient is off by > 1.5×
    schedule = schedules.get_schedule("linear", T)
    np.testing.assert_allclose(schedule.sqrt_alphas_cumprod, s["abar"], rtol=1e-6)
    np.testing.assert_allclose(schedule.sqrt_one_minus_alphas_cumprod, s["bbar"], rtol=1e-6)


@pytest.mark.parametrize("t", [0, 9, 99, 299])
def test_seed_forward_marginals_by_monte_carlo(t):
    """Items 1–3 under eq. (2): iterating x_t = α_t x_{t−1} + β_t ε_t gives x_t ~ N(ᾱ_t x_0, β̄_t² I)."""
    s = seed_symbols()
    rng = np.random.default_rng(t)
    x0, n = 0.7, 200_000
    x = np.full(n, x0)
    for i in range(t + 1):
        x = s["a"][i] * x + s["b"][i] * rng.standard_normal(n)
    assert abs(x.mean() - s["abar"][t] * x0) <= 5 * x.std() / np.sqrt(n)
    assert abs(x.var() - s["bbar"][t] ** 2) <= 5 * x.var() * np.sqrt(2 / n)
    schedule = schedules.get_schedule("linear", T)
    mean, var, _ = diffusion.q_mean_variance(schedule, jnp.full((1, 1), x0), jnp.asarray([t]))
    np.testing.assert_allclose([float(mean[0, 0]), float(var[0, 0])], [s["abar"][t] * x0, s["bbar"][t] ** 2], rtol=1e-5)


@pytest.mark.parametrize("t", [0, 10, 500])
def test_eq1_bayes_for_gaussian_data(t):
    """Eq. (1): q(x_{t−1}|x_t) = q(x_t|x_{t−1}) q(x_{t−1})/q(x_t); closed form for x_0 ~ N(μ, s²)."""
    mu, sd = 0.3, 0.2
    s = seed_symbols()
    x_t, x_prev = 0.4, np.linspace(-1.5, 1.5, 41)
    marg = lambda ab: stats.norm(ab * mu, np.sqrt(ab**2 * sd**2 + 1 - ab**2))  # noqa: E731  (seed ᾱ)
    bayes = (stats.norm.pdf(x_t, s["a"][t] * x_prev, s["b"][t]) * marg(s["abar_prev"][t]).pdf(x_prev)
             / marg(s["abar"][t]).pdf(x_t))  # fmt: skip
    schedule = schedules.get_schedule("linear", T)
    mean, var = oracles.gaussian_reverse_moments(schedule, mu, sd, np.full(1, x_t), np.array([t]))
    np.testing.assert_allclose(bayes, stats.norm.pdf(x_prev, mean[0], np.sqrt(var[0])), rtol=1e-4)


@pytest.mark.parametrize("t", STEPS)
def test_eq2_bayes_given_x0_is_eq5(t):
    """Eq. (2) evaluated pointwise equals the Gaussian of eq. (5) (= Ho eqs. 6–7)."""
    s = seed_symbols()
    x0, x_t, x_prev = -0.3, 0.5, np.linspace(-2, 2, 41)
    log_ratio = (stats.norm.logpdf(x_t, s["a"][t] * x_prev, s["b"][t])
                 + stats.norm.logpdf(x_prev, s["abar_prev"][t] * x0, s["bbar_prev"][t])
                 - stats.norm.logpdf(x_t, s["abar"][t] * x0, s["bbar"][t]))  # fmt: skip
    mean, var = seed_eq5(x_t, x0, t, s)
    log_q = stats.norm.logpdf(x_prev, mean, np.sqrt(var))
    np.testing.assert_allclose(log_ratio, log_q, rtol=1e-9, atol=1e-9 * np.abs(log_q).max())
    np.testing.assert_allclose([mean, var], paper_posterior(t, x0, x_t), rtol=1e-10)


# --------------------------------------------------------------------------
# Eqs. (3)–(5): the two compensating factors of 2.


@pytest.mark.parametrize("t", STEPS)
def test_eq3_is_twice_the_log_posterior(t):
    """Dropping the ½ of every exponent makes (3) equal 2·log q(x_{t−1}|x_t, x_0) + const, not log q + const."""
    s = seed_symbols()
    x0, x_t, x_prev = 0.2, -0.6, np.linspace(-1, 1, 21)
    mean, var = paper_posterior(t, x0, x_t)
    log_q = stats.norm.logpdf(x_prev, mean, np.sqrt(var))
    e3 = seed_eq3(x_prev, x_t, x0, t, s)
    spread = lambda v: np.ptp(v) / np.ptp(log_q)  # noqa: E731  (0 for a constant)
    assert spread(e3 - 2 * log_q) < 1e-6
    assert spread(e3 - log_q) > 0.5


@pytest.mark.parametrize("t", STEPS)
def test_eq4_expands_eq3_and_the_variance_step(t):
    """(4) is the right expansion of (3). Reading Σ⁻¹ = −2A from it halves the variance (the seed's
    β_t² β̄_{t−1}²/(2β̄_t²)); the doubled exponent gives Σ⁻¹ = −A; the seed's "· 2" restores β̃_t."""
    s = seed_symbols()
    x0, x_t = 0.2, -0.6
    A, linear = seed_eq4_coefficients(x_t, x0, t, s)
    e = lambda x: seed_eq3(x, x_t, x0, t, s)  # noqa: E731
    np.testing.assert_allclose((e(1.0) + e(-1.0) - 2 * e(0.0)) / 2, A, rtol=1e-7)  # quadratic coefficient
    np.testing.assert_allclose((e(1.0) - e(-1.0)) / 2, linear, rtol=1e-7, atol=1e-7 * abs(A))
    # The seed's algebra −2A = 2β̄_t²/(β_t² β̄_{t−1}²) is right ...
    np.testing.assert_allclose(-2 * A, 2 * s["bbar"][t] ** 2 / (s["b"][t] ** 2 * s["bbar_prev"][t] ** 2), rtol=1e-10)
    _, true_var = paper_posterior(t, x0, x_t)
    seed_sigma = 1 / (-2 * A)  # ... but Σ = 1/(−2A) is half the posterior variance,
    np.testing.assert_allclose(seed_sigma / true_var, 0.5, rtol=1e-10)
    np.testing.assert_allclose(1 / (-A), true_var, rtol=1e-10)  # Σ⁻¹ = −A is right for the doubled exponent,
    np.testing.assert_allclose(seed_sigma * 2, seed_eq5(x_t, x0, t, s)[1], rtol=1e-10)  # and "· 2" patches it.


@pytest.mark.parametrize("t", STEPS)
def test_the_mean_step(t):
    """In (4) the linear coefficient is 2Σ⁻¹μ (doubled exponent), so
    Σ⁻¹μ = α_t/β_t² x_t + ᾱ_{t−1}/β̄_{t−1}² x_0 is right; the standard form −½(x − μ)ᵀΣ⁻¹(x − μ)
    the seed cites has linear coefficient Σ⁻¹μ, not 2Σ⁻¹μ.
    With its halved Σ the seed gets μ/2, and its "· 2" restores eq. (5)'s mean."""
    s = seed_symbols()
    x0, x_t = 0.2, -0.6
    A, linear = seed_eq4_coefficients(x_t, x0, t, s)
    mean, var = paper_posterior(t, x0, x_t)
    np.testing.assert_allclose(linear / 2, mean / var, rtol=1e-10)  # Σ⁻¹μ
    log_q = lambda x: stats.norm.logpdf(x, mean, np.sqrt(var))  # noqa: E731
    np.testing.assert_allclose((log_q(1.0) - log_q(-1.0)) / 2, mean / var, rtol=1e-6)  # standard form: Σ⁻¹μ
    seed_mu = linear / 2 * (1 / (-2 * A))
    np.testing.assert_allclose(seed_mu, mean / 2, rtol=1e-10)
    np.testing.assert_allclose(seed_mu * 2, seed_eq5(x_t, x0, t, s)[0], rtol=1e-10)


@pytest.mark.parametrize("t", [0] + STEPS)
def test_eq5_is_ddpm_jax_q_posterior(t):
    """Eq. (5) (correct) is Ho eqs. 6–7 and ddpm_jax's posterior_mean_coef1/2 and posterior_variance."""
    s = seed_symbols()
    schedule = schedules.get_schedule("linear", T)
    c_x0 = seed_eq5(0.0, 1.0, t, s)[0]
    c_xt, var = seed_eq5(1.0, 0.0, t, s)
    np.testing.assert_allclose(schedule.posterior_mean_coef1[t], c_x0, rtol=1e-6)
    np.testing.assert_allclose(schedule.posterior_mean_coef2[t], c_xt, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(schedule.posterior_variance[t], var, rtol=1e-6)


# --------------------------------------------------------------------------
# Eqs. (6)–(7) and the final sampling formula.


@pytest.mark.parametrize("t", [0] + STEPS)
def test_eq6_and_eq7(t):
    """(6) inverts the forward process; (7) is (5) at x_0 = x̂_0(ε), Ho's eq. 11, and ddpm_jax's eps_to_mean."""
    s = seed_symbols()
    rng = np.random.default_rng(t)
    x0, eps = rng.uniform(-1, 1, 8), rng.standard_normal(8)
    x_t = s["abar"][t] * x0 + s["bbar"][t] * eps
    x0_hat = (x_t - s["bbar"][t] * eps) / s["abar"][t]  # eq. (6)
    np.testing.assert_allclose(x0_hat, x0, rtol=1e-9, atol=1e-12)
    eps_model = eps + rng.standard_normal(8)  # any ε_θ, not the true noise
    x0_hat = (x_t - s["bbar"][t] * eps_model) / s["abar"][t]
    mean7 = seed_eq7_mean(x_t, eps_model, t, s)
    np.testing.assert_allclose(mean7, seed_eq5(x_t, x0_hat, t, s)[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mean7, ho_algorithm2_mean(x_t, eps_model, t), rtol=1e-12)
    schedule = schedules.get_schedule("linear", T)
    tt = jnp.full((8,), t, jnp.int32)
    x_t32, eps32 = jnp.asarray(x_t, jnp.float32), jnp.asarray(eps_model, jnp.float32)
    np.testing.assert_allclose(diffusion.eps_to_x0(schedule, x_t32, tt, eps32), x0_hat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(diffusion.eps_to_mean(schedule, x_t32, tt, eps32), mean7, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", STEPS)
def test_the_multiplied_out_mean_is_wrong(t):
    """α_t/√ᾱ_t x_t + β_t√ᾱ_{t−1}/β̄_t ε ≠ (7) under every reading of its symbols: the ε coefficient has
    the wrong sign at every step, and the x_t coefficient is far from 1/α_t once ᾱ_t is small.
    x_t/α_t − β_t²/(α_t β̄_t) ε is the right expansion."""
    s = seed_symbols()
    rng = np.random.default_rng(t)
    x_t, eps = rng.standard_normal(1000), rng.standard_normal(1000)
    corrected = x_t / s["a"][t] - s["b"][t] ** 2 / (s["a"][t] * s["bbar"][t]) * eps
    np.testing.assert_allclose(corrected, seed_eq7_mean(x_t, eps, t, s), rtol=1e-12)
    right_x, right_eps = seed_eq7_mean(1.0, 0.0, t, s), seed_eq7_mean(0.0, 1.0, t, s)
    for reading in READINGS:
        wrong_x, wrong_eps = seed_multiplied_out(1.0, 0.0, t, reading), seed_multiplied_out(0.0, 1.0, t, reading)
        assert wrong_eps * right_eps < 0, reading
        if np.cumprod(1 - BETAS)[t] < 0.1:  # zero-based t >= 475
            assert wrong_x / right_x > 1.5, reading


def test_the_seed_noise_scale_is_fixed_small():
    """The seed's σ_t = β̄_{t−1}β_t/β̄_t is √β̃_t (ddpm_jax 'fixed_small');
    Ho et al. also use σ_t² = β_t ('fixed_large')."""
    s = seed_symbols()
    schedule = schedules.get_schedule("linear", T)
    t = jnp.arange(1, T, dtype=jnp.int32)
    x = jnp.zeros((T - 1, 1))

    def variance(name):  # σ² as p(x_{t−1}|x_t) uses it: the resolved record read at t
        log_var = diffusion.extract(jnp.asarray(variances.resolve(name, variances.chain(schedule)).log_variance),
                                    t, x.shape)
        return diffusion.p_mean_variance(schedule, x, x, t, log_var)["variance"][:, 0]

    small, large = variance("fixed_small"), variance("fixed_large")
    sigma = s["bbar_prev"] * s["b"] / s["bbar"]
    np.testing.assert_allclose(np.sqrt(small), sigma[1:], rtol=1e-5)
    np.testing.assert_allclose(large, BETAS[1:], rtol=1e-5)


def _run_chain(step, eps_fn, n, rng):
    """x_T ~ N(0, 1) → x_0 with x_{t−1} = step(x_t, ε(x_t, t), t) + σ_t z, float64, 1-D."""
    s = seed_symbols()
    sigma = s["bbar_prev"] * s["b"] / s["bbar"]
    x = rng.standard_normal(n)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T - 1, -1, -1):
            x = step(x, eps_fn(x, t), t) + (sigma[t] * rng.standard_normal(n) if t > 0 else 0)
    return x


def test_final_sampling_formula_is_wrong_and_algorithm2_samples_the_data():
    """With the exact ε* = E[ε|x_t] for Gaussian data, Algorithm 2 (= ddpm_jax) recovers N(μ, s²);
    the seed's final formula x_{t−1} = α_t/√ᾱ_t x_t + β_t√ᾱ_{t−1}/β̄_t ε_θ + σ_t z diverges under every reading."""
    mu, sd, n = 0.3, 0.2, 20_000
    ac = np.cumprod(1 - BETAS)
    eps_star = lambda x, t: np.sqrt(1 - ac[t]) * (x - np.sqrt(ac[t]) * mu) / (ac[t] * sd**2 + 1 - ac[t])  # noqa: E731
    x = _run_chain(ho_algorithm2_mean, eps_star, n, np.random.default_rng(0))
    assert abs(x.mean() - mu) < 5 * sd / np.sqrt(n) + 0.01 and abs(x.std() - sd) < 0.02
    # ddpm_jax's mean is Algorithm 2's.
    schedule = schedules.get_schedule("linear", T)
    x_t = jnp.asarray(np.linspace(-2, 2, 9), jnp.float32)
    log_small = variances.resolve("fixed_small", variances.chain(schedule)).log_variance  # σ does not enter the mean
    for t in (0, 500, 999):
        tt = jnp.full((9,), t, jnp.int32)
        e = jnp.asarray(eps_star(np.asarray(x_t, np.float64), t), jnp.float32)
        got = diffusion.p_mean_variance(schedule, e, x_t, tt, log_small[t])["mean"]
        np.testing.assert_allclose(got, ho_algorithm2_mean(np.asarray(x_t, np.float64), np.asarray(e, np.float64), t),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    for reading in READINGS:
        step = lambda x, e, t: seed_multiplied_out(x, e, t, reading)  # noqa: E731
        bad = _run_chain(step, eps_star, 1000, np.random.default_rng(1))
        assert not np.all(np.abs(bad) < 1e3), reading  # overflows: the x_t coefficient is > 1 at most steps
