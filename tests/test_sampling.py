"""Tests of ddpm_jax.sampling against closed forms for Gaussian data and float64 NumPy.

Data x_0 ~ N(μ, diag s²) has the exact ε-predictor (tests/oracles.py) E[ε | x_t] =
√(1 − ᾱ_t)(x_t − √ᾱ_t μ)/(ᾱ_t s² + 1 − ᾱ_t), linear in x_t, so every chain
below is a linear-Gaussian recursion whose output moments `chain_moments`
computes exactly in float64; the Monte Carlo moments of the sampler must match
them within a few standard errors, and they in turn sit close to the data.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling, schedules, variances
from oracles import gaussian_eps_oracle, gaussian_gamma

T = 1000
MU = np.array([0.5, -0.3, 0.2])
S = np.array([0.1, 0.5, 1.0])  # a different scale per dimension
SCHEDULE = schedules.get_schedule("linear", T)
# One model function for most tests: the compiled chain is cached per function, so sharing it saves compiles.
ORACLE = gaussian_eps_oracle(SCHEDULE, MU, S)


def alphas_cumprod64() -> np.ndarray:
    return np.cumprod(1.0 - schedules.linear_betas(T))


def oracle64(x_t, ac, mu, s):
    return np.sqrt(1.0 - ac) * (x_t - np.sqrt(ac) * mu) / (ac * s**2 + 1.0 - ac)


def chain_moments(kind, kept, mu, s, gamma=None):
    """Exact per-dimension mean and std of the sampler's x_0 (x_T ~ N(0, 1)), float64.

    Each step is x ↦ A x + b + σ z with A, b from the linear oracle, so
    m ↦ A m + b and v ↦ A² v + σ². kind: 'fixed_small' | 'fixed_large' | 'analytic' | 'ddim0'.
    """
    ac = alphas_cumprod64()[kept]
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1.0 - ac / ac_prev
    beta_tilde = beta * (1.0 - ac_prev) / (1.0 - ac)
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for i in reversed(range(len(kept))):
        c = np.sqrt(1.0 - ac[i]) / (ac[i] * s**2 + 1.0 - ac[i])  # ε = c (x − √ᾱ μ)
        if kind == "ddim0":  # x' = √ᾱ' x̂_0 + √(1 − ᾱ') ε, x̂_0 = (x − √(1 − ᾱ) ε)/√ᾱ
            x0_a, x0_b = (1.0 - np.sqrt(1.0 - ac[i]) * c) / np.sqrt(ac[i]), np.sqrt(1.0 - ac[i]) * c * mu
            a = np.sqrt(ac_prev[i]) * x0_a + np.sqrt(1.0 - ac_prev[i]) * c
            b = np.sqrt(ac_prev[i]) * x0_b - np.sqrt(1.0 - ac_prev[i]) * c * np.sqrt(ac[i]) * mu
            sigma2 = 0.0
        else:  # Ho Algorithm 2: x' = (x − β/√(1 − ᾱ) ε)/√α + σ z
            k = beta[i] / np.sqrt(1.0 - ac[i])
            a, b = (1.0 - k * c) / np.sqrt(1.0 - beta[i]), k * c * np.sqrt(ac[i]) * mu / np.sqrt(1.0 - beta[i])
            if kind == "fixed_small":
                sigma2 = beta_tilde[i]
            elif kind == "fixed_large":
                sigma2 = beta[i]
            else:  # Analytic-DPM Thm. 1 with λ² = β̃
                gap = np.sqrt((1.0 - ac[i]) / (1.0 - beta[i])) - np.sqrt(1.0 - ac_prev[i] - beta_tilde[i])
                sigma2 = beta_tilde[i] + gap**2 * (1.0 - gamma[kept[i]])
            sigma2 = sigma2 if i > 0 else 0.0  # no noise at the last step
        m, v = a * m + b, a * a * v + sigma2
    return m, np.sqrt(v)


def assert_moments(x, mean, std, num_se=5.0):
    n = x.shape[0]
    se_mean, se_std = std / np.sqrt(n), std / np.sqrt(2.0 * (n - 1))
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), num_se * se_mean)
    np.testing.assert_array_less(np.abs(x.std(0, ddof=1) - std), num_se * se_std)


# --------------------------------------------------------------------------
# Distributional tests with the Gaussian oracle.


@pytest.mark.parametrize("variance,eta,kind", [("fixed_small", None, "fixed_small"),
                                               ("fixed_large", None, "fixed_large"),
                                               (None, 0.0, "ddim0")])
def test_full_chain_moments_match_the_data(variance, eta, kind):
    n = 6000
    x = sampling.sample(ORACLE, SCHEDULE, jax.random.key(0), (n, 3), variance=variance, eta=eta)
    mean, std = chain_moments(kind, np.arange(T), MU, S)
    assert_moments(np.asarray(x, np.float64), mean, std)
    # The chain's own discretisation bias at K = T (a property of the method, not of this code).
    np.testing.assert_array_less(np.abs(mean - MU), 2e-3)
    np.testing.assert_array_less(np.abs(std - S), 0.04 * S)


def test_analytic_variance_makes_a_10_step_chain_exact_for_isotropic_data():
    s, n, num_steps = 0.5, 20_000, 10
    model_fn = gaussian_eps_oracle(SCHEDULE, MU, s)
    gamma = gaussian_gamma(SCHEDULE, s)  # [T]: the sampler reads it at the 10 kept steps
    np.testing.assert_allclose(gamma, (1.0 - alphas_cumprod64()) / (alphas_cumprod64() * s**2 + 1.0
                                                                     - alphas_cumprod64()), rtol=1e-5)
    x = sampling.sample(model_fn, SCHEDULE, jax.random.key(1), (n, 3), num_steps=num_steps, variance="analytic",
                        stats={"gamma": gamma})
    assert_moments(np.asarray(x, np.float64), MU, np.full(3, s))
    kept = schedules.space_timesteps(T, num_steps, "even")
    _, std = chain_moments("analytic", kept, MU, np.full(3, s), gamma)
    np.testing.assert_allclose(std, s, atol=2e-4)
    # Without Γ the same 10-step chain is visibly off (std ≈ 0.32), so the test above can fail.
    _, std_small = chain_moments("fixed_small", kept, MU, np.full(3, s))
    assert np.all(np.abs(std_small - s) > 0.1)


# --------------------------------------------------------------------------
# Single steps against float64 NumPy, with the sampler's own z.


def step_noise(rng, i, batch, example_shape):
    _, chain_key = jax.random.split(rng)
    return np.asarray(sampling.example_noise(jax.random.fold_in(chain_key, i), jnp.arange(batch), example_shape),
                      np.float64)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_each_step_is_algorithm_2_in_float64_and_the_last_adds_no_noise(variance):
    rng, batch = jax.random.key(2), 64
    x, traj = sampling.sample(ORACLE, SCHEDULE, rng, (batch, 3), variance=variance, return_trajectory=True)
    traj = np.asarray(traj, np.float64)
    betas = schedules.linear_betas(T)
    ac = alphas_cumprod64()
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    for i in (T - 1, 500, 1, 0):
        x_t, x_prev = traj[T - 1 - i], traj[T - i]
        eps = oracle64(x_t, ac[i], MU, S)
        sigma2 = betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]) if variance == "fixed_small" else betas[i]
        z = step_noise(rng, i, batch, (3,)) if i > 0 else 0.0  # Algorithm 2: z = 0 at t = 1
        # Ho Algorithm 2 (= seed: x_{t−1} = (1/√α_t)(x_t − β_t/√(1 − ᾱ_t) ε) + σ_t z).
        expected = (x_t - betas[i] / np.sqrt(1.0 - ac[i]) * eps) / np.sqrt(1.0 - betas[i]) + np.sqrt(sigma2) * z
        np.testing.assert_allclose(x_prev, expected, rtol=0, atol=2e-6, err_msg=f"step i={i}")
    np.testing.assert_array_equal(np.asarray(x), traj[-1])
    # Noise at the last step, even with the smallest σ the sampler knows there (√β̃_2 ≈ 7e-3), would show.
    sigma_1 = np.exp(0.5 * float(SCHEDULE.posterior_log_variance_clipped[0]))
    assert np.max(np.abs(sigma_1 * step_noise(rng, 0, batch, (3,)))) > 1e-3


def test_ddim_eta_one_is_ancestral_fixed_small():
    ancestral = sampling.sample(ORACLE, SCHEDULE, jax.random.key(4), (64, 3))
    ddim = sampling.sample(ORACLE, SCHEDULE, jax.random.key(4), (64, 3), eta=1.0)
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ancestral), atol=2e-5)
    # eta is shorthand for the record variances.ddim(eta), also reachable by name.
    for variance in (variances.ddim(1.0), "ddim_eta1"):
        by_record = sampling.sample(ORACLE, SCHEDULE, jax.random.key(4), (64, 3), variance=variance)
        np.testing.assert_array_equal(np.asarray(by_record), np.asarray(ddim))


def test_ddim_eta_zero_is_a_deterministic_map_of_x_T():
    kept = schedules.space_timesteps(T, 50, "quad")
    x, traj = sampling.sample(ORACLE, SCHEDULE, jax.random.key(5), (64, 3), steps=kept, eta=0.0,
                              return_trajectory=True)
    ac = alphas_cumprod64()[kept]
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    y = np.asarray(traj[0], np.float64)  # x_T; no noise enters below (Song et al. eq. 12, σ = 0)
    for i in reversed(range(len(kept))):
        eps = oracle64(y, ac[i], MU, S)
        y = np.sqrt(ac_prev[i]) * (y - np.sqrt(1.0 - ac[i]) * eps) / np.sqrt(ac[i]) + np.sqrt(1.0 - ac_prev[i]) * eps
    np.testing.assert_allclose(np.asarray(x), y, atol=1e-5)


# --------------------------------------------------------------------------
# Parameterisations and every σ choice agree where they must.


def test_x0_and_v_predictions_give_the_eps_samples():
    def as_x0(x_t, t):
        ac = SCHEDULE.alphas_cumprod[t][:, None]
        return (x_t - jnp.sqrt(1.0 - ac) * ORACLE(x_t, t)) / jnp.sqrt(ac)

    def as_v(x_t, t):
        ac = SCHEDULE.alphas_cumprod[t][:, None]
        return jnp.sqrt(ac) * ORACLE(x_t, t) - jnp.sqrt(1.0 - ac) * as_x0(x_t, t)

    reference = sampling.sample(ORACLE, SCHEDULE, jax.random.key(6), (64, 3), num_steps=20)
    for mean_type, fn in (("x0", as_x0), ("v", as_v)):
        x = sampling.sample(fn, SCHEDULE, jax.random.key(6), (64, 3), num_steps=20, mean_type=mean_type)
        np.testing.assert_allclose(np.asarray(x), np.asarray(reference), atol=1e-5, err_msg=mean_type)


def test_learned_variances_reproduce_the_fixed_ones():
    # Per dimension: σ² = β̃_t, β_t, β̃_t (learned: log σ² itself; learned_range: v = −1, +1, −1).
    small, large = np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0])
    learned_log_var = lambda t: (small * SCHEDULE.posterior_log_variance_clipped[t][:, None]
                                 + large * SCHEDULE.log_betas[t][:, None])
    learned_v = lambda t: jnp.broadcast_to(large - small, (t.shape[0], 3))

    def with_var(value_fn):
        return lambda x_t, t: jnp.concatenate([ORACLE(x_t, t), value_fn(t)], axis=-1)

    ref_small = np.asarray(sampling.sample(ORACLE, SCHEDULE, jax.random.key(7), (64, 3), variance="fixed_small"))
    ref_large = np.asarray(sampling.sample(ORACLE, SCHEDULE, jax.random.key(7), (64, 3), variance="fixed_large"))
    expected = small * ref_small + large * ref_large
    assert np.max(np.abs(ref_small - ref_large)) > 1e-2  # the two references differ
    for variance, value_fn in (("learned", learned_log_var), ("learned_range", learned_v)):
        x = sampling.sample(with_var(value_fn), SCHEDULE, jax.random.key(7), (64, 3), variance=variance)
        np.testing.assert_allclose(np.asarray(x), expected, atol=1e-5, err_msg=variance)


@pytest.mark.parametrize("eta", [None, 0.0])
def test_clip_x0_clips_the_prediction(eta):
    far = lambda x_t, t: jnp.full_like(x_t, 5.0)  # an x_0-predictor far outside [−1, 1]
    x = sampling.sample(far, SCHEDULE, jax.random.key(8), (64, 3), num_steps=10, mean_type="x0", eta=eta,
                        clip_x0=True)
    # The last step returns x̂_0 itself (ᾱ_{t−1} = 1, no noise): 1, not the model's 5.
    np.testing.assert_allclose(np.asarray(x), 1.0, atol=1e-5)


# --------------------------------------------------------------------------
# Respacing, trajectory, chunking, compilation.


def test_respaced_chain_conditions_the_model_on_original_timesteps():
    seen = []

    def model_fn(x_t, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t).tolist()), t, ordered=True)
        return jnp.zeros_like(x_t)

    for kw, kept in ((dict(num_steps=7), schedules.space_timesteps(T, 7, "even")),
                     (dict(num_steps=7, spacing="quad"), schedules.space_timesteps(T, 7, "quad")),
                     (dict(steps=[0, 3, 10, 999]), [0, 3, 10, 999])):
        seen.clear()
        sampling.sample(model_fn, SCHEDULE, jax.random.key(9), (4, 3), **kw).block_until_ready()
        assert seen == [[int(t)] * 4 for t in reversed(kept)], kw


def test_trajectory_shape_chunking_and_progress_agree():
    model_fn = gaussian_eps_oracle(SCHEDULE, 0.0, 0.5)
    kw = dict(num_steps=10, variance="fixed_large")
    shape = (4, 2, 2, 1)
    x = sampling.sample(model_fn, SCHEDULE, jax.random.key(10), shape, **kw)
    _, traj = sampling.sample(model_fn, SCHEDULE, jax.random.key(10), shape, return_trajectory=True, **kw)
    assert x.shape == shape and traj.shape == (11, *shape)
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x))
    init_key, _ = jax.random.split(jax.random.key(10))
    x_T = sampling.example_noise(init_key, jnp.arange(4), shape[1:])
    np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(x_T))
    # Chunks of 3, 3, 3, 1 steps; the bar's default chunk is 1 step here (⌈10/20⌉), the same program.
    for chunk_kw in (dict(chunk_size=3), dict(progress=True)):
        _, traj_c = sampling.sample(model_fn, SCHEDULE, jax.random.key(10), shape, return_trajectory=True,
                                    **kw, **chunk_kw)
        np.testing.assert_allclose(np.asarray(traj_c), np.asarray(traj), atol=1e-6, err_msg=str(chunk_kw))


def test_compiled_once_per_configuration():
    traces = []

    def model_fn(x_t, t):
        traces.append(x_t.shape)  # runs only while tracing
        return 0.1 * x_t

    linear, cosine = schedules.get_schedule("linear", 40), schedules.get_schedule("cosine", 40)
    for i, (sched, eta) in enumerate([(linear, 0.0), (cosine, 0.5), (linear, 1.0)]):
        sampling.sample(model_fn, sched, jax.random.key(i), (2, 3), eta=eta)
    assert len(traces) == 1  # new schedule, η and key: same program
    traces.clear()
    sampling.sample(model_fn, linear, jax.random.key(0), (2, 3), eta=0.0, chunk_size=8)  # 5 chunks of 8 steps
    sampling.sample(model_fn, linear, jax.random.key(0), (2, 3), eta=0.0, chunk_size=12)  # 12, 12, 12 and 4
    assert len(traces) == 3


_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from ddpm_jax import sampling, schedules, variances
    from oracles import gaussian_eps_oracle
    assert jax.local_device_count() == 8
    schedule = schedules.get_schedule("linear", {T})
    model_fn = gaussian_eps_oracle(schedule, {mu}, {s})
    out = {{}}
    for name, eta in (("ancestral", None), ("ddim", 0.5)):
        x = sampling.sample(model_fn, schedule, jax.random.key(11), (16, 3), num_steps=20, eta=eta)
        assert len(x.sharding.device_set) == 8
        out[name] = np.asarray(x)
    try:
        sampling.sample(model_fn, schedule, jax.random.key(11), (12, 3), num_steps=20)
    except ValueError as err:
        assert "divisible by the device count 8" in str(err), err
    else:
        raise AssertionError("a batch of 12 over 8 devices must raise")
    np.savez({path!r}, **out)
""")


def test_samples_do_not_depend_on_the_device_count(tmp_path):
    path = str(tmp_path / "samples.npz")
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # the script imports ddpm_jax and tests/oracles.py
    paths = (os.path.dirname(tests_dir), tests_dir, os.environ.get("PYTHONPATH"))
    pythonpath = os.pathsep.join(p for p in paths if p)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=pythonpath)
    script = _DEVICE_SCRIPT.format(T=T, mu=MU.tolist(), s=S.tolist(), path=path)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    out = np.load(path)
    assert jax.local_device_count() == 1
    for name, eta in (("ancestral", None), ("ddim", 0.5)):
        here = np.asarray(sampling.sample(ORACLE, SCHEDULE, jax.random.key(11), (16, 3), num_steps=20, eta=eta))
        np.testing.assert_allclose(out[name], here, rtol=0, atol=1e-6, err_msg=f"{name}: 8 devices vs 1")


# --------------------------------------------------------------------------
# Argument errors: one ValueError naming the field, before any tracing.


@pytest.mark.parametrize("kw,field", [
    (dict(variance="fixed_medium"), "variance"),
    (dict(mean_type="score"), "mean_type"),
    (dict(eta=1.5), "eta"),
    (dict(eta=-0.1), "eta"),
    (dict(eta=0.5, variance="fixed_large"), "eta"),
    (dict(eta=0.5, variance="learned_range"), "eta"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=1001), "num_steps"),
    (dict(num_steps=10, steps=[0, 5]), "num_steps or steps"),
    (dict(steps=[5, 3]), "steps"),
    (dict(spacing="log"), "spacing"),
    (dict(variance="analytic"), "needs stats \\['gamma'\\]"),
    (dict(variance="analytic", stats={"gamma": np.zeros(10)}), "stats\\['gamma'\\] must have shape \\[T\\]"),
    (dict(variance="analytic", num_steps=10, stats={"gamma": np.full(T, np.nan)}), "not estimated at steps"),
    (dict(variance="analytic", stats={"gamma": np.zeros(T)}, decoder="middle"), "decoder must be one of"),
    (dict(variance=3), "variance must be"),
    (dict(sigma_clip_steps=-1), "sigma_clip_steps"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(shape=(3,)), "shape"),
    (dict(devices=[]), "devices"),
    (dict(rng=np.uint32(0)), "rng"),
])
def test_invalid_arguments_raise_one_clear_error(kw, field):
    def model_fn(x_t, t):
        raise AssertionError("must fail before tracing the model")

    args = dict(rng=jax.random.key(0), shape=(4, 3))
    args.update(kw)
    with pytest.raises(ValueError, match=field):
        sampling.sample(model_fn, SCHEDULE, args.pop("rng"), args.pop("shape"), **args)


def test_wrong_model_output_shape_is_reported():
    with pytest.raises(ValueError, match="model_fn output must have shape"):
        sampling.sample(lambda x, t: x[..., :1], SCHEDULE, jax.random.key(0), (4, 3), num_steps=5)
    with pytest.raises(ValueError, match="2C channels"):
        sampling.sample(lambda x, t: x, SCHEDULE, jax.random.key(0), (4, 3), num_steps=5, variance="learned")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), r"num_steps must be an int in \[1, 100\]"),
    (dict(spacing="log"), "spacing must be one of"),
    (dict(num_steps=10, steps=[0, 50]), "give num_steps or steps, not both"),
    (dict(eta=1.5), r"eta must be None .* or a float in \[0, 1\]"),
    (dict(eta=0.5, variance="fixed_large"), "eta \\(DDIM\\) sets σ_t\\(η\\) itself"),
    (dict(stats=[1.0]), "stats must be None or a mapping"),
    (dict(sigma_clip_steps=-1), "sigma_clip_steps must be an int >= 0"),
])
def test_prepare_chain_names_the_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampling.prepare_chain(schedules.get_schedule("linear", 100), **kwargs)
    with pytest.raises(ValueError, match="schedule must be a ddpm_jax.schedules.Schedule"):
        sampling.prepare_chain(np.linspace(1e-4, 0.02, 100))


def test_prepare_chain_is_the_sub_chain_and_the_resolved_sigma_of_sample():
    schedule = schedules.get_schedule("linear", 100)
    sub, resolved = sampling.prepare_chain(schedule, num_steps=10, variance="fixed_large")
    kept = schedules.kept_steps(100, 10, "even")
    np.testing.assert_array_equal(sub.timesteps, schedules.sub_chain(schedule, kept).timesteps)
    want = variances.resolve(variances.get("fixed_large"), variances.chain(schedule, kept), None)
    np.testing.assert_array_equal(resolved.variance, want.variance)
    assert resolved.name == "fixed_large" and resolved.variance.shape == (10,)
