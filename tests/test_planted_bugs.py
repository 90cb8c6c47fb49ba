"""Fast checks, each against an independent reference, written to catch the bugs scripts/plant_bugs.py plants.

Modules: variances (chain, decoders, clipping, resolve), statistics (Γ estimator, at_steps),
trajectories (pair costs, the DP), ddim_bound (its terms in float64), resume (lock, config
check) and pretrained (layouts, names, scheduler mapping). References are float64 NumPy written
from the papers' formulas, hand-derived names and shapes, or brute force. Seconds in all.
"""

import importlib.util
import itertools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import ddim_bound, pretrained, resume, schedules, statistics, trajectories, variances

ROOT = pathlib.Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)
T = 100
SCHEDULE = schedules.get_schedule("linear", T)


def _ref(alphas_cumprod):
    """(ᾱ, ᾱ_prev, β, β̃, √ᾱ_prev β/(1 − ᾱ)) of a chain given by its ᾱ, float64 (Ho et al. eqs. 4, 7)."""
    ac = np.asarray(alphas_cumprod, np.float64)
    ac_prev = np.append(1.0, ac[:-1])
    beta = 1.0 - ac / ac_prev
    return ac, ac_prev, beta, beta * (1.0 - ac_prev) / (1.0 - ac), np.sqrt(ac_prev) * beta / (1.0 - ac)


FULL_AC = np.cumprod(1.0 - schedules.linear_betas(T))


# --------------------------------------------------------------------------
# variances: the chain, clipping, resolve.


@pytest.mark.parametrize("kept", [np.arange(T), np.array([0, 7, 40, 99]), np.array([0])])
def test_chain_arrays_match_float64(kept):
    c = variances.chain(SCHEDULE, kept)
    ac, ac_prev, beta, beta_tilde, coef1 = _ref(FULL_AC[kept])
    np.testing.assert_allclose(c.alphas_cumprod, ac, rtol=1e-7)
    np.testing.assert_allclose(c.betas, beta, rtol=1e-6)
    np.testing.assert_allclose(c.posterior_variance, beta_tilde, rtol=1e-6)
    np.testing.assert_allclose(c.posterior_mean_coef1, coef1, rtol=1e-6)
    # improved-diffusion's clipped log β̃_1: β̃ at the second step; β_1 on a 1-step chain.
    np.testing.assert_allclose(c.sub_beta_tilde_2, beta_tilde[1] if len(kept) > 1 else beta[0], rtol=1e-6)
    full_beta_tilde_2 = _ref(FULL_AC)[3][1]
    np.testing.assert_allclose(c.full_beta_tilde_2, full_beta_tilde_2, rtol=1e-6)


def test_a_respaced_schedule_alone_does_not_know_the_full_chain_s_beta_tilde_2():
    c = variances.chain(schedules.respace(SCHEDULE, [0, 5, 99]))
    assert c.full_beta_tilde_2 is None
    with pytest.raises(ValueError, match="full_chain"):
        variances.resolve("fixed_large", c, decoder="full_chain")
    c = variances.chain(schedules.respace(SCHEDULE, [0, 1, 99]))  # keeps steps 0 and 1: it does
    np.testing.assert_allclose(c.full_beta_tilde_2, _ref(FULL_AC)[3][1], rtol=1e-6)


def test_analytic_variance_is_clipped_to_thm2_upper_bound_where_gamma_is_small():
    """Bao et al. Thm. 2 for data in [−1, 1]: σ² ≤ λ² + c²; with Γ = 0 the bound is active where ᾱ_t < ½."""
    kept = np.array([0, 20, 50, 80, 99])
    c = variances.chain(SCHEDULE, kept)
    ac, _, beta, lam2, coef1 = _ref(FULL_AC[kept])
    gap2 = beta**2 / ((1 - beta) * (1 - ac))
    sigma2 = variances.analytic_variance(c, np.zeros(len(kept)))
    np.testing.assert_allclose(sigma2, lam2 + np.minimum(gap2, coef1**2), rtol=1e-6)
    assert np.any(gap2 > coef1**2) and np.any(gap2 < coef1**2)  # both sides of the clip are tested


def test_sigma_clipping_threshold_and_only_when_sampling():
    """Analytic-DPM's reverse_ddpm.py: σ² ≤ (2 px · 2/255 · √(π/2))² on the last noisy step; never in the bound."""
    c = variances.chain(schedules.get_schedule("linear", 1000), schedules.kept_steps(1000, 10))
    plain = variances.resolve("fixed_large", c).variance
    threshold = (2 * 2 / 255 * np.sqrt(np.pi / 2)) ** 2
    sampled = variances.resolve("fixed_large", c, clip_steps=1, clip_pixel=2.0).variance
    np.testing.assert_allclose(sampled[1], min(plain[1], threshold), rtol=1e-6)
    assert plain[1] > threshold
    bound = variances.resolve("fixed_large", c, clip_steps=1, clip_pixel=2.0, for_bound=True).variance
    np.testing.assert_array_equal(bound, plain)


def test_ddim_gets_a_decoder_variance_only_in_the_bound():
    kept = np.array([0, 30, 99])
    c = variances.chain(SCHEDULE, kept)
    beta_tilde = _ref(FULL_AC[kept])[3]
    sampler = variances.resolve(variances.ddim(0.5), c).variance
    bound = variances.resolve(variances.ddim(0.5), c, for_bound=True).variance
    np.testing.assert_allclose(sampler, 0.25 * beta_tilde, rtol=2e-6, atol=0)
    np.testing.assert_allclose(bound, np.append(beta_tilde[1], 0.25 * beta_tilde[1:]), rtol=2e-6)


@pytest.mark.parametrize("spec", ["ddim_eta1.5", "ddim_eta-0.1", "ddim_etax", "ddim_etanan"])
def test_ddim_eta_outside_the_unit_interval_is_refused(spec):
    with pytest.raises(ValueError, match="η must be a float in \\[0, 1\\]"):
        variances.get(spec)


# --------------------------------------------------------------------------
# statistics: Γ over padded batches, at_steps.


def _constant_model(x_t, t):
    """ε_θ = t + 1 in the first C channels (and 100 in C more, which Γ must not read): Γ_t = (t + 1)² exactly."""
    first = jnp.ones_like(x_t) * (t.astype(jnp.float32) + 1.0).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.concatenate([first, 100.0 * jnp.ones_like(x_t)], axis=-1)


@pytest.mark.parametrize("batch_size", [3, 7, 256])
def test_gamma_of_a_constant_model_is_exact_whatever_the_batching(batch_size):
    schedule = schedules.get_schedule("linear", 30)
    data = np.random.default_rng(0).uniform(-1, 1, (7, 2, 2, 1)).astype(np.float32)  # 7 = 2·3 + 1: padded
    steps = [0, 4, 29]
    gamma = statistics.estimate_gamma(_constant_model, schedule, data, jax.random.PRNGKey(0), steps=steps,
                                      batch_size=batch_size)
    np.testing.assert_allclose(gamma[steps], (np.asarray(steps) + 1.0) ** 2, rtol=1e-6)
    assert np.all(np.isnan(np.delete(gamma, steps)))


def test_at_steps_reads_the_full_chain_at_the_kept_steps():
    values = np.arange(T, dtype=np.float64) ** 2
    np.testing.assert_array_equal(statistics.at_steps("g", values, np.array([0, 5, 99])), [0.0, 25.0, 9801.0])
    values[5] = np.nan
    with pytest.raises(ValueError, match="not estimated at steps \\[5\\]"):
        statistics.at_steps("g", values, np.array([0, 5, 99]))


# --------------------------------------------------------------------------
# trajectories: pair costs in float64, totals, the DP, the statistics.

TT = 10
SMALL = schedules.get_schedule("linear", TT, beta_start=0.01, beta_end=0.5)
SMALL_AC = np.cumprod(1.0 - np.asarray(schedules.linear_betas(TT, beta_start=0.01, beta_end=0.5), np.float64))


def _pair_kl_float64(s, t, sigma2_of, eps_mse):
    """Ho eq. 7 on the jump t → s: KL(N(μ̃, λ²) ‖ N(μ̃ + c(ε_θ − ε), σ²)) averaged over ε, bits/dim."""
    a_s, a_t = SMALL_AC[s], SMALL_AC[t]
    beta = 1.0 - a_t / a_s
    lam2 = beta * (1.0 - a_s) / (1.0 - a_t)
    c = np.sqrt(a_s) * beta / (1.0 - a_t) * np.sqrt((1.0 - a_t) / a_t)  # x_0 − x̂_0 = √((1 − ᾱ_t)/ᾱ_t)(ε_θ − ε)
    sigma2 = sigma2_of(beta, lam2)
    return (0.5 * (np.log(sigma2 / lam2) + lam2 / sigma2 - 1.0) + c**2 * eps_mse[t] / (2.0 * sigma2)) / LN2


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_pair_costs_match_the_gaussian_kl_in_float64(variance):
    eps_mse = np.linspace(0.02, 0.4, TT)
    costs = trajectories.pair_costs(trajectories.full_chain(SMALL), {"eps_mse": eps_mse}, variance,
                                    np.zeros(TT), prior=0.0)
    sigma2_of = {"fixed_small": lambda beta, lam2: lam2, "fixed_large": lambda beta, lam2: beta}[variance]
    for s, t in [(0, 1), (0, 9), (2, 5), (4, 9), (8, 9)]:
        np.testing.assert_allclose(costs.kl[s, t], _pair_kl_float64(s, t, sigma2_of, eps_mse), rtol=1e-9)
    assert np.all(np.isinf(costs.kl[np.tril_indices(TT)]))


def test_trajectory_total_is_prior_plus_decoder_of_its_second_step_plus_its_kls():
    rng = np.random.default_rng(1)
    kl = np.triu(rng.uniform(0.1, 1.0, (TT, TT)), k=1)
    kl[np.tril_indices(TT)] = np.inf
    decoder = rng.uniform(1.0, 2.0, TT)
    costs = trajectories.PairCosts(kl, decoder, 0.7)
    steps = [0, 3, 6, 9]
    assert costs.total(steps) == pytest.approx(0.7 + decoder[3] + kl[0, 3] + kl[3, 6] + kl[6, 9], rel=1e-12)
    np.testing.assert_allclose(costs.terms(steps), [decoder[3], kl[0, 3], kl[3, 6], kl[6, 9]])
    assert costs.total([0]) == pytest.approx(0.7 + decoder[0])


@pytest.mark.parametrize("num_steps", [2, 3, 5])
def test_dp_finds_the_brute_force_optimum(num_steps):
    F = np.random.default_rng(num_steps).uniform(0.0, 1.0, (8, 8))
    F[np.tril_indices(8)] = np.inf  # only forward jumps s < t exist
    best = min(trajectories.trajectory_cost(F, (0, *mid, 7)) for mid in itertools.combinations(range(1, 7),
                                                                                                 num_steps - 2))
    steps = trajectories.optimal_steps(F, num_steps)
    assert len(steps) == num_steps and steps[0] == 0 and steps[-1] == 7 and np.all(np.diff(steps) > 0)
    assert trajectories.trajectory_cost(F, steps) == pytest.approx(best, rel=1e-12)


def test_first_step_log_variances_are_the_decoder_of_the_two_step_chain():
    """fixed_small, 'sub_chain': σ_1² = β̃ of the jump t → 0, (1 − ᾱ_0)(1 − ᾱ_t/ᾱ_0)/(1 − ᾱ_t); β_1 for [0] alone."""
    got = trajectories.first_step_log_variances(SMALL, "fixed_small", decoder="sub_chain")
    a0, at = SMALL_AC[0], SMALL_AC[1:]
    want = np.log(np.append(1.0 - a0, (1.0 - a0) * (1.0 - at / a0) / (1.0 - at)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_step_statistics_of_the_exact_eps_model():
    """x_0 = 0, so x_t = √(1 − ᾱ_t) ε and ε_θ = x_t/√(1 − ᾱ_t) = ε: M_t = 0 and Γ_t = E ε² (chi-square / d)."""
    data = np.zeros((64, 4, 4, 1), np.float32)
    model = lambda x, t: x / jnp.take(SMALL.sqrt_one_minus_alphas_cumprod, t).reshape(-1, 1, 1, 1)  # noqa: E731
    stats = trajectories.estimate_step_statistics(model, SMALL, data, jax.random.PRNGKey(0), batch_size=32)
    np.testing.assert_allclose(stats["eps_mse"], 0.0, atol=1e-8)
    np.testing.assert_allclose(stats["gamma"], 1.0, atol=6 * np.sqrt(2 / (64 * 16)))


# --------------------------------------------------------------------------
# ddim_bound: every term in float64, clipping active.


def test_ddim_bound_terms_match_float64_with_clipping():
    """Song et al. eqs. 7, 12: KL = ‖√ᾱ_{t−1}(x_0 − x̂_0) + √(1 − ᾱ_{t−1} − σ²)(ε − ε̂)‖²/(2σ²), ε̂ from clipped x̂_0."""
    eta, kept = 0.6, np.array([0, 2, 5, 9])
    x0 = jnp.asarray(np.random.default_rng(2).uniform(-0.9, 0.9, (5, 3, 1)).round(2), jnp.float32)
    model_fn = lambda x, t: 1.7 * x  # noqa: E731  x̂_0 leaves [−1, 1] at several steps
    rng = jax.random.PRNGKey(3)
    out = ddim_bound.ddim_bpd_terms(model_fn, SMALL, x0, rng, eta=eta, steps=kept, clip_x0=True)

    ac, ac_prev, _, beta_tilde, _ = _ref(SMALL_AC[kept])
    sigma2 = np.append(beta_tilde[1], eta**2 * beta_tilde[1:])  # decoder 'sub_chain'
    x = np.asarray(x0, np.float64)
    clipped_somewhere = False
    for i, key in enumerate(jax.random.split(rng, len(kept))):
        eps = np.asarray(jax.random.normal(key, x0.shape, x0.dtype), np.float64)
        x_t = np.sqrt(ac[i]) * x + np.sqrt(1 - ac[i]) * eps
        raw = (x_t - np.sqrt(1 - ac[i]) * 1.7 * x_t) / np.sqrt(ac[i])
        clipped_somewhere |= bool(np.any(np.abs(raw) > 1))
        x0_hat = np.clip(raw, -1, 1)
        eps_hat = (x_t - np.sqrt(ac[i]) * x0_hat) / np.sqrt(1 - ac[i])
        np.testing.assert_allclose(out["mse"][i], ((eps_hat - eps) ** 2).mean(axis=(1, 2)), rtol=1e-3, atol=1e-5)
        if i == 0:
            continue  # the decoder term: losses' discretized likelihood, tested in test_losses
        err = np.sqrt(ac_prev[i]) * (x - x0_hat) + np.sqrt(1 - ac_prev[i] - sigma2[i]) * (eps - eps_hat)
        np.testing.assert_allclose(out["terms"][i], (err**2 / (2 * sigma2[i])).mean(axis=(1, 2)) / LN2,
                                   rtol=2e-3, atol=1e-5, err_msg=f"step {i}")
    assert clipped_somewhere
    prior = (0.5 * (-1 - np.log(1 - ac[-1]) + (1 - ac[-1]) + ac[-1] * x**2)).mean(axis=(1, 2)) / LN2
    np.testing.assert_allclose(out["prior"], prior, rtol=1e-4)
    np.testing.assert_allclose(out["total"], np.asarray(out["terms"], np.float64).sum(0) + prior, rtol=1e-5)
    # The decoder term is the discretized NLL of x_0 under N(x̂_0, σ_1²) (Ho eq. 13): above 0 and finite.
    assert np.all(np.isfinite(out["terms"][0])) and np.all(np.asarray(out["terms"][0]) > 0)


def test_ddim_decoder_term_is_the_discretized_nll_of_x0():
    from scipy import special  # pylint: disable=import-outside-toplevel

    kept = np.array([0, 4, 9])
    x0 = jnp.asarray(np.array([-1.0, -0.5, 0.0, 0.3, 1.0]).reshape(5, 1, 1), jnp.float32)
    model_fn = lambda x, t: jnp.zeros_like(x)  # noqa: E731  x̂_0 = x_t/√ᾱ_1
    rng = jax.random.PRNGKey(4)
    out = ddim_bound.ddim_bpd_terms(model_fn, SMALL, x0, rng, eta=1.0, steps=kept)
    ac = SMALL_AC[kept]
    sigma = np.sqrt(_ref(ac)[3][1])
    eps = np.asarray(jax.random.normal(jax.random.split(rng, 3)[0], x0.shape), np.float64)
    x = np.asarray(x0, np.float64)
    mean = (np.sqrt(ac[0]) * x + np.sqrt(1 - ac[0]) * eps) / np.sqrt(ac[0])
    upper = np.where(x > 0.999, np.inf, (x + 1 / 255 - mean) / sigma)
    lower = np.where(x < -0.999, -np.inf, (x - 1 / 255 - mean) / sigma)
    nll = -np.log(special.ndtr(upper) - special.ndtr(lower)).reshape(5) / LN2
    np.testing.assert_allclose(out["terms"][0], nll, rtol=2e-4)


def test_ddim_bound_refuses_eta_zero():
    with pytest.raises(ValueError, match="eta must be a float in \\(0, 1\\]"):
        ddim_bound.ddim_log_variance(SMALL, 0.0, np.array([0, 9]))


# --------------------------------------------------------------------------
# resume: the lock and the config check (in-process: flock conflicts between two open files).


def test_a_second_lock_on_the_workdir_is_refused_naming_the_holder_and_released_after(tmp_path):
    import os  # pylint: disable=import-outside-toplevel

    with resume.workdir_lock(str(tmp_path)):
        with pytest.raises(resume.ResumeRefused, match=f'"pid": {os.getpid()}'):
            with resume.workdir_lock(str(tmp_path)):
                pass
    with resume.workdir_lock(str(tmp_path)):  # released: a new run locks it
        pass


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "experiments" / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _changed(path, value):
    config = _tiny()
    group, field = path.split(".")
    config[group][field] = value
    return config


def test_config_changes_names_experiment_fields_and_passes_run_fields(tmp_path):
    previous = json.loads(_tiny().to_json_best_effort())
    assert resume.config_changes(previous, _tiny()) == []
    assert resume.config_changes(previous, _changed("training.lr", 0.123)) == [
        f"training.lr: {previous['training']['lr']!r} -> 0.123"]
    assert resume.config_changes(previous, _changed("diffusion.variance", "fixed_small")) != []
    for path, value in [("training.num_train_steps", 10**6), ("training.log_every", 7), ("sampling.num_steps", 3),
                        ("eval.num_steps", 3), ("data.worker_count", 3)]:
        assert resume.config_changes(previous, _changed(path, value)) == [], path
    # check_config_change reads workdir/config.json and refuses unless allowed.
    (tmp_path / "config.json").write_text(json.dumps({"config": previous}))
    config = _changed("training.lr", 0.123)
    with pytest.raises(resume.ResumeRefused, match="training.lr"):
        resume.check_config_change(str(tmp_path), config, allow=False)
    assert resume.check_config_change(str(tmp_path), config, allow=True) == [
        f"training.lr: {previous['training']['lr']!r} -> 0.123"]


# --------------------------------------------------------------------------
# pretrained: names, layouts and the scheduler mapping against diffusers' definitions.


@pytest.mark.parametrize("key, path", [
    ("conv_in.weight", ("conv_in", "kernel")),
    ("time_embedding.linear_1.bias", ("temb_dense0", "bias")),
    ("down_blocks.1.attentions.0.to_k.weight", ("down_1_attn_0", "k", "kernel")),
    ("down_blocks.0.resnets.1.conv_shortcut.bias", ("down_0_block_1", "nin_shortcut", "bias")),
    ("down_blocks.2.downsamplers.0.conv.weight", ("down_2_downsample", "conv", "kernel")),
    ("up_blocks.0.resnets.2.norm1.weight", ("up_3_block_2", "norm1", "scale")),  # diffusers' up 0 is our level 3
    ("up_blocks.3.upsamplers.0.conv.bias", ("up_0_upsample", "conv", "bias")),
    ("mid_block.resnets.0.time_emb_proj.weight", ("mid_block_1", "temb_proj", "kernel")),
    ("mid_block.resnets.1.conv2.weight", ("mid_block_2", "conv2", "kernel")),
    ("mid_block.attentions.0.to_q.weight", ("mid_attn_1", "q", "kernel")),
    ("mid_block.attentions.0.to_out.0.weight", ("mid_attn_1", "proj_out", "kernel")),
    ("mid_block.attentions.0.group_norm.weight", ("mid_attn_1", "norm", "scale")),
    ("conv_norm_out.bias", ("norm_out", "bias")),
])
def test_diffusers_keys_map_to_our_param_paths(key, path):
    assert pretrained.flax_path(key, num_levels=4) == path


def test_torch_layouts_convert_elementwise():
    conv = np.arange(5 * 3 * 3 * 2, dtype=np.float32).reshape(5, 2, 3, 3)  # [O, I, kh, kw], kh ≠ kw content
    out = pretrained.torch_to_flax(conv, (3, 3, 2, 5))
    for o, i, h, w in itertools.product(range(5), range(2), range(3), range(3)):
        assert out[h, w, i, o] == conv[o, i, h, w]
    square = np.arange(16, dtype=np.float32).reshape(4, 4)  # [O, I] with O = I: a missing transpose is silent
    np.testing.assert_array_equal(pretrained.torch_to_flax(square, (4, 4)), square.T)
    one_by_one = np.arange(12, dtype=np.float32).reshape(3, 4, 1, 1)
    np.testing.assert_array_equal(pretrained.torch_to_flax(one_by_one, (4, 3)), one_by_one[:, :, 0, 0].T)


@pytest.mark.parametrize("raw, field, value", [
    ({"variance_type": "fixed_large"}, "variance", "fixed_large"),
    ({"variance_type": "fixed_small_log"}, "variance", "fixed_small"),
    ({"variance_type": "learned_range"}, "variance", "learned_range"),
    ({"prediction_type": "sample"}, "mean_type", "x0"),
    ({"prediction_type": "v_prediction"}, "mean_type", "v"),
    ({}, "mean_type", "eps"),
    ({"clip_sample": False}, "clip_x0", False),
    ({}, "clip_x0", True),
    ({"num_train_timesteps": 40}, "num_timesteps", 40),
])
def test_scheduler_fields_map_as_diffusers_defines_them(raw, field, value):
    assert pretrained.diffusion_fields({"_class_name": "DDPMScheduler", **raw})[field] == value


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2", "linear"])
def test_scheduler_betas_are_diffusers_formulas(beta_schedule):
    """DDPMScheduler: scaled_linear = linspace(√β₀, √β₁)², squaredcos_cap_v2 = GLIDE's cosine capped at 0.999."""
    n, b0, b1 = 50, 1e-3, 0.05
    fields = pretrained.diffusion_fields({"num_train_timesteps": n, "beta_start": b0, "beta_end": b1,
                                          "beta_schedule": beta_schedule})
    betas = np.asarray(schedules.get_schedule(fields["schedule"], n, **fields["schedule_kwargs"]).betas, np.float64)
    if beta_schedule == "scaled_linear":
        want = np.linspace(b0**0.5, b1**0.5, n) ** 2
    elif beta_schedule == "linear":
        want = np.linspace(b0, b1, n)
    else:
        alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        want = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
        assert want[-1] == 0.999  # the cap is active
    np.testing.assert_allclose(betas, want, rtol=1e-5)


def test_released_unet_structure_maps_to_our_fields():
    """google/ddpm-cifar10-32: attention at level 1 of 32 px → 16 px; channels 128·(1, 2, 2, 2)."""
    unet = {"block_out_channels": [128, 256, 256, 256], "attention_head_dim": None, "downsample_padding": 0,
            "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-06, "sample_size": 32,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
    fields = pretrained.unet_fields(unet)
    assert (fields["ch"], fields["ch_mult"], fields["attn_resolutions"], fields["num_res_blocks"]) == (
        128, (1, 2, 2, 2), (16,), 2)
    with pytest.raises(ValueError, match="flip_sin_to_cos"):
        pretrained.unet_fields({**unet, "flip_sin_to_cos": True})


def test_a_learned_variance_needs_twice_the_channels():
    unet = pretrained.unet_fields({"block_out_channels": [32, 64], "attention_head_dim": None, "downsample_padding": 0,
                                   "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-06, "sample_size": 32,
                                   "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "norm_num_groups": 8,
                                   "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "out_channels": 6})
    learned = pretrained.diffusion_fields({"variance_type": "learned_range"})
    assert pretrained.make_config(unet, learned, "cifar10").diffusion.variance == "learned_range"
    with pytest.raises(ValueError, match="out_channels"):
        pretrained.make_config({**unet, "out_channels": 3}, learned, "cifar10")
    with pytest.raises(ValueError, match="out_channels"):
        pretrained.make_config(unet, pretrained.diffusion_fields({}), "cifar10")
