"""Tests for ddpm_jax/schedules.py: each β schedule and every derived array against float64 NumPy.

References are written from the papers, independently of the code: Ho et al.
2020 §4 (linear), Nichol & Dhariwal 2021 eq. 17 (cosine), Ho's code (quad),
GeoDiff (sigmoid), Lin et al. 2024 Alg. 1 (zero terminal SNR), N&D §4 (respacing).
"""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_jax import schedules

FIELDS = (
    "betas alphas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod log_betas "
    "posterior_variance posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2"
).split()
RTOL = 1e-5  # float32 storage of float64 values


def _linear(T, start=1e-4, end=0.02):
    return np.array([start + (end - start) * i / (T - 1) for i in range(T)])


def _cosine(T, s=0.008, max_beta=0.999):
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)])


def _quadratic(T, start=1e-4, end=0.02):
    return np.array([(start**0.5 + (end**0.5 - start**0.5) * i / (T - 1)) ** 2 for i in range(T)])


def _sigmoid(T, start=1e-4, end=0.02):
    return np.array([start + (end - start) / (1 + math.exp(6 - 12 * i / (T - 1))) for i in range(T)])


def _reference_betas(name, T):
    """Independent β for get_schedule(name, T) with default arguments."""
    if name == "linear":  # N&D scale the end points by 1000/T to keep the total noise.
        return _linear(T, 1e-4 * 1000 / T, 0.02 * 1000 / T)
    return {"cosine": _cosine, "quadratic": _quadratic, "sigmoid": _sigmoid}[name](T)


def _lin_rescale(betas):
    """Lin et al. 2024, Algorithm 1, in float64."""
    sqrt_ac = np.sqrt(np.cumprod(1 - betas))
    sqrt_ac = (sqrt_ac - sqrt_ac[-1]) * sqrt_ac[0] / (sqrt_ac[0] - sqrt_ac[-1])
    ac = sqrt_ac**2
    return 1 - ac / np.append(1.0, ac[:-1])


def _assert_fields(schedule, reference, rtol=RTOL):
    for name in FIELDS:
        actual = np.asarray(getattr(schedule, name))
        assert actual.dtype == np.float32 and actual.shape == reference[name].shape, name
        np.testing.assert_allclose(actual, reference[name], rtol=rtol, atol=0, err_msg=name)


names = st.sampled_from(["linear", "cosine", "quadratic", "sigmoid"])
lengths = st.integers(21, 2000)  # the linear end point 0.02·1000/T stays below 1 for T >= 21


# --------------------------------------------------------------------------
# Named schedules.


def test_linear_is_ho_at_1000_steps():
    betas = np.asarray(schedules.get_schedule("linear", 1000).betas, np.float64)
    np.testing.assert_allclose(betas, _linear(1000), rtol=1e-6)
    assert betas[0] == np.float32(1e-4) and betas[-1] == np.float32(0.02)


def test_cosine_is_clipped_at_0999_and_follows_its_alpha_bar():
    schedule = schedules.get_schedule("cosine", 1000)
    betas = np.asarray(schedule.betas)
    assert betas.max() == np.float32(0.999) == betas[-1]
    np.testing.assert_allclose(schedule.alphas[-1], 0.001, rtol=RTOL)  # ᾱ_T ≈ 2.4e-9 is not floored
    f = np.cos((np.arange(1, 1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    # ᾱ_t = f(t)/f(0) wherever β was not clipped (all but the last step).
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod)[:-1], f[:-1], rtol=RTOL)


@settings(max_examples=20, deadline=None)
@given(name=names, T=lengths)
def test_named_schedule_and_every_derived_field_match_float64(name, T, reference_fields):
    _assert_fields(schedules.get_schedule(name, T), reference_fields(_reference_betas(name, T)))


@settings(max_examples=15, deadline=None)
@given(betas=st.lists(st.floats(1e-6, 0.999), min_size=1, max_size=60))
def test_custom_schedule_fields_match_float64(betas, reference_fields):
    schedule = schedules.get_schedule("custom", len(betas), betas=betas)
    _assert_fields(schedule, reference_fields(betas))
    np.testing.assert_array_equal(schedule.timesteps, np.arange(len(betas)))


@settings(max_examples=20, deadline=None)
@given(name=names, T=lengths, zero_snr=st.booleans())
def test_chain_is_consistent(name, T, zero_snr):
    """α = 1 − β in (0, 1), ᾱ = ∏α strictly decreasing, every field finite (also near ᾱ ≈ 0)."""
    schedule = schedules.get_schedule(name, T, zero_terminal_snr=zero_snr)
    alphas = np.asarray(schedule.alphas, np.float64)
    betas = np.asarray(schedule.betas, np.float64)
    assert np.all((alphas > 0) & (alphas < 1))
    np.testing.assert_allclose(alphas, 1 - betas, rtol=0, atol=1e-7)
    ac = np.asarray(schedule.alphas_cumprod)
    np.testing.assert_allclose(ac, np.cumprod(alphas), rtol=RTOL)
    assert np.all(np.diff(ac) < 0)
    for field in FIELDS:
        assert np.all(np.isfinite(getattr(schedule, field))), field


# --------------------------------------------------------------------------
# Zero terminal SNR.


@settings(max_examples=10, deadline=None)
@given(name=names, T=lengths)
def test_zero_terminal_snr(name, T, reference_fields):
    base = _reference_betas(name, T)
    rescaled = _lin_rescale(base)
    assert np.sqrt(np.cumprod(1 - rescaled))[-1] == 0.0 and rescaled[-1] == 1.0
    np.testing.assert_allclose(schedules.rescale_zero_terminal_snr(base), rescaled, rtol=1e-12)

    schedule = schedules.get_schedule(name, T, zero_terminal_snr=True)
    # √ᾱ_1 is kept: the first step is untouched.
    np.testing.assert_allclose(schedule.sqrt_alphas_cumprod[0], np.sqrt(1 - base[0]), rtol=1e-7)
    # Stored: α_T floored at 2⁻²⁴, i.e. ᾱ_T = 2⁻²⁴ ᾱ_{T−1}; every other step is Lin et al.'s chain.
    floored = np.append(rescaled[:-1], 1 - schedules.ZERO_SNR_ALPHA)
    _assert_fields(schedule, reference_fields(floored))
    assert schedule.betas[-1] == np.float32(1 - 2.0**-24)  # the largest float32 below 1
    assert schedule.sqrt_alphas_cumprod[-1] <= 2.0**-12  # x_T keeps < 2.5e-4 of x_0


def test_zero_snr_floor_is_on_the_last_step_not_on_alpha_bar():
    """A fixed floor ᾱ_T = 2⁻²⁴ would exceed the rescaled ᾱ_{T−1} of linear T = 1000 and make α_T > 1."""
    rescaled_ac = np.cumprod(1 - _lin_rescale(_reference_betas("linear", 1000)))
    assert rescaled_ac[-2] < 2.0**-24
    schedule = schedules.get_schedule("linear", 1000, zero_terminal_snr=True)
    np.testing.assert_allclose(schedule.alphas[-1], 2.0**-24, rtol=1e-7)
    np.testing.assert_allclose(schedule.alphas_cumprod[-1], 2.0**-24 * rescaled_ac[-2], rtol=RTOL)


# --------------------------------------------------------------------------
# Respacing.


@st.composite
def chains(draw):
    name, T = draw(names), draw(st.integers(21, 1000))
    K = draw(st.integers(1, T))
    kind = draw(st.sampled_from(schedules.SPACINGS))
    return name, T, draw(st.booleans()), schedules.space_timesteps(T, K, kind)


@settings(max_examples=25, deadline=None)
@given(chain=chains())
def test_respace_keeps_marginals_and_recomputes_betas(chain, reference_fields):
    name, T, zero_snr, steps = chain
    parent = schedules.get_schedule(name, T, zero_terminal_snr=zero_snr)
    sub = schedules.respace(parent, steps)
    np.testing.assert_array_equal(sub.timesteps, steps)
    # q(x_{s_i}|x_0) = N(√ᾱ_{s_i} x_0, 1 − ᾱ_{s_i}) is unchanged.
    for field in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        np.testing.assert_allclose(getattr(sub, field), np.asarray(getattr(parent, field))[steps], rtol=RTOL)
    # β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}} from the float64 parent, and every derived field follows from it.
    betas = _reference_betas(name, T)
    if zero_snr:
        betas = np.append(_lin_rescale(betas)[:-1], 1 - schedules.ZERO_SNR_ALPHA)
    ac = np.cumprod(1 - betas)[steps]
    _assert_fields(sub, reference_fields(1 - ac / np.append(1.0, ac[:-1])))


def test_respace_of_all_steps_is_the_identity():
    parent = schedules.get_schedule("cosine", 200)
    sub = schedules.respace(parent, np.arange(200))
    for name in FIELDS + ["timesteps"]:
        np.testing.assert_allclose(getattr(sub, name), getattr(parent, name), rtol=1e-6, err_msg=name)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 500), data=st.data())
def test_respace_of_respace(T, data):
    parent = schedules.get_schedule("cosine", T)
    outer = schedules.space_timesteps(T, data.draw(st.integers(1, T)), "even")
    inner = schedules.space_timesteps(len(outer), data.draw(st.integers(1, len(outer))), "quad")
    twice = schedules.respace(schedules.respace(parent, outer), inner)
    np.testing.assert_array_equal(twice.timesteps, outer[inner])
    # Also where a sub-chain's β is within a float32 ulp of 1 (cosine ᾱ_T ≈ 1e-6 over one step).
    np.testing.assert_allclose(twice.alphas_cumprod, np.asarray(parent.alphas_cumprod)[outer[inner]], rtol=RTOL)


def test_respace_twice_keeps_a_tiny_terminal_alpha_bar():
    parent = schedules.get_schedule("cosine", 1000)  # ᾱ_T ≈ 2.4e-9: the sub-chain's β_1 rounds to 1 in float32
    twice = schedules.respace(schedules.respace(parent, [0, 999]), [0, 1])
    np.testing.assert_allclose(twice.alphas_cumprod, np.asarray(parent.alphas_cumprod)[[0, 999]], rtol=RTOL)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 3000), data=st.data(), kind=st.sampled_from(schedules.SPACINGS))
def test_space_timesteps(T, data, kind):
    K = data.draw(st.integers(1, T))
    steps = schedules.space_timesteps(T, K, kind)
    assert len(steps) == K and steps[0] == 0 and steps[-1] <= T - 1
    assert np.all(np.diff(steps) > 0)
    if kind == "even":
        if K > 1:
            assert steps[-1] == T - 1
            assert np.ptp(np.diff(steps)) <= 1  # gaps differ by rounding only
    elif kind == "uniform":  # DDIM's code: range(0, T, T // K), its first K steps
        np.testing.assert_array_equal(steps, (T // K) * np.arange(K))
    else:  # DDIM's quadratic spacing, moved up only where rounding merged steps
        raw = np.minimum(np.floor(np.linspace(0, math.sqrt(0.8 * T), K) ** 2), T - 1)
        assert np.all(steps >= raw)


def test_quad_spacing_matches_ddim_at_1000_steps():
    steps = schedules.space_timesteps(1000, 50, "quad")
    raw = np.array([int((i * math.sqrt(800) / 49) ** 2) for i in range(50)])  # DDIM's code
    # Where truncation merges early steps, each is moved up to one past its predecessor.
    forced = np.maximum.accumulate(raw - np.arange(50)) + np.arange(50)
    np.testing.assert_array_equal(steps, forced)
    assert np.sum(steps != raw) <= 3
    np.testing.assert_array_equal(schedules.space_timesteps(2, 2, "quad"), [0, 1])  # round(0.8·2) = 2 is capped


# --------------------------------------------------------------------------
# Errors name the field.


@settings(max_examples=20, deadline=None)
@given(name=st.text(min_size=1, max_size=8).filter(lambda n: n not in schedules.SCHEDULES), T=st.integers(1, 10))
def test_unknown_schedule_name(name, T):
    with pytest.raises(ValueError, match="schedule name"):
        schedules.get_schedule(name, T)


@pytest.mark.parametrize("T", [0, -3, 2.5, True, "10"])
def test_bad_num_timesteps(T):
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.get_schedule("cosine", T)


@settings(max_examples=20, deadline=None)
@given(
    good=st.lists(st.floats(1e-4, 0.5), min_size=1, max_size=10),
    bad=st.sampled_from([0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")]),
    where=st.integers(0, 10),
)
def test_custom_betas_outside_unit_interval(good, bad, where):
    betas = list(good)
    betas.insert(where % (len(betas) + 1), bad)
    with pytest.raises(ValueError, match="betas must lie in the open interval"):
        schedules.get_schedule("custom", len(betas), betas=betas)


@pytest.mark.parametrize(
    "name, kwargs, field",
    [
        ("linear", dict(beta_end=1.2), "beta_end"),
        ("linear", dict(beta_start=0.0), "beta_start"),
        ("quadratic", dict(beta_start=-1e-3), "beta_start"),
        ("sigmoid", dict(beta_end=1.0), "beta_end"),
        ("cosine", dict(max_beta=1.0), "max_beta"),
        ("cosine", dict(s=-0.1), "s must be"),
        ("cosine", dict(beta_end=0.02), "beta_end"),  # an argument the schedule does not take
        ("custom", dict(betas=[0.1, 0.2]), r"betas must have shape \(10,\)"),
    ],
)
def test_bad_schedule_arguments_name_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        schedules.get_schedule(name, 10, **kwargs)


def test_linear_needs_beta_end_below_one():
    with pytest.raises(ValueError, match="beta_end"):
        schedules.get_schedule("linear", 20)  # 0.02·1000/20 = 1


def test_zero_terminal_snr_needs_two_steps():
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        schedules.get_schedule("cosine", 1, zero_terminal_snr=True)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 100), K=st.integers(-5, 205), kind=st.sampled_from(schedules.SPACINGS))
def test_bad_num_steps(T, K, kind):
    if 1 <= K <= T:
        return
    with pytest.raises(ValueError, match="num_steps"):
        schedules.space_timesteps(T, K, kind)


def test_bad_spacing_kind():
    with pytest.raises(ValueError, match="spacing kind"):
        schedules.space_timesteps(100, 10, "log")


@pytest.mark.parametrize("steps", [[], [0, 0, 1], [3, 2], [0, 10], [-1, 3], [[0, 1]]])
def test_bad_respace_steps(steps):
    with pytest.raises(ValueError, match="steps must"):
        schedules.respace(schedules.get_schedule("cosine", 10), steps)


def test_schedule_is_a_pytree_that_jits():
    schedule = schedules.get_schedule("cosine", 50)
    # FIELDS, timesteps, and the float64 ᾱ as raw bits
    assert len(jax.tree_util.tree_leaves(schedule)) == len(FIELDS) + 2
    total = jax.jit(lambda s: s.alphas_cumprod.sum())(schedule)
    np.testing.assert_allclose(total, np.asarray(schedule.alphas_cumprod, np.float64).sum(), rtol=1e-6)


def test_betas_that_underflow_alpha_bar_before_the_last_step_are_refused():
    betas = np.full(200, 0.99)  # 0.01²⁰⁰ underflows float64 long before step 200
    with pytest.raises(ValueError, match="betas drive"):
        schedules.get_schedule("custom", 200, betas=betas)
    assert np.isfinite(np.asarray(schedules.get_schedule("custom", 20, betas=betas[:20]).alphas_cumprod)).all()


@pytest.mark.parametrize("name, T, zero_snr", [("linear", 1000, False), ("cosine", 50, False), ("linear", 1000, True)])
def test_the_exact_float64_alphas_cumprod_travels_with_the_schedule(name, T, zero_snr, reference_fields):
    """variances.chain reads ᾱ in float64 from the Schedule: it must be the host's float64 value to the bit."""
    schedule = schedules.get_schedule(name, T, zero_terminal_snr=zero_snr)
    ac = schedules.alphas_cumprod_f64(schedule)
    assert ac.dtype == np.float64 and ac.shape == (T,)
    betas = np.asarray(schedules.SCHEDULES[name](T), np.float64)
    if zero_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    np.testing.assert_array_equal(ac, schedules.floor_terminal(np.cumprod(1.0 - betas)))
    np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), ac.astype(np.float32))
    jitted = jax.jit(lambda s: s)(schedule)  # the bits survive a trip through jit
    np.testing.assert_array_equal(schedules.alphas_cumprod_f64(jitted), ac)
