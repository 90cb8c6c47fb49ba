"""Fuzzing the input boundary: a bad input raises ONE ValueError naming the field, before any compilation.

Every example breaks ONE field of a valid input (the tiny config, or valid
arguments of a public function) and checks three things that do not depend on
the code under test:
  1. nothing but ValueError escapes;
  2. the message names the broken field (or a field it is documented to be
     coupled with, COUPLED below);
  3. no XLA compilation happened (a jax.monitoring listener counts them);
     and, over many calls, validation takes milliseconds.
An input accepted by the validator must also be sane: a value of another type
than the field's (a string for an int, NaN for a float, ...) or a negative
number is never accepted, and an accepted schedule or step list is checked
against its definition.

Large values go only where they allocate nothing (or fail to allocate at once):
a fuzzer that builds a 10^9-step schedule would take the shared machine down.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddpm_jax import config_validation, losses, sampling, schedules, variances
from ddpm_jax.evaluation import nll

REPO = Path(__file__).resolve().parents[1]
# derandomize: the same examples on every run (a failure reproduces; memory and time are bounded).
FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
SECONDS: dict[str, list[float]] = {}  # per boundary, the duration of every fuzzed call


# --------------------------------------------------------------------------
# Compilation counter and the per-call checks.

_COMPILES: list[str] = []
# schedules.get_schedule casts its float64 arrays to float32 ON the device, which compiles
# one tiny conversion per new length (a reported wart: jax.device_put of float32 NumPy arrays
# compiles nothing).
# Anything else compiled while validating (a model, a sampler, a train step) fails the test.
_TOLERATED = ("jit(convert_element_type)",)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(kw.get("fun_name", "?"))
    if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") not in _TOLERATED else None)


@contextlib.contextmanager
def _boundary(name: str):
    """Counts and times the call, and fails if anything was compiled inside."""
    compiled = len(_COMPILES)
    start = time.perf_counter()
    yield
    SECONDS.setdefault(name, []).append(time.perf_counter() - start)
    assert _COMPILES[compiled:] == [], f"{name} compiled {_COMPILES[compiled:]} while validating"


def _check_rejection(call, fields: tuple[str, ...], what: str):
    """Runs call(); returns its result, or None when it raised a ValueError naming one of `fields`."""
    try:
        return call()
    except ValueError as err:
        assert any(f in str(err) for f in fields), f"{what}: the message {str(err)!r} names none of {fields}"
        return None
    except Exception as err:  # pylint: disable=broad-except
        pytest.fail(f"{what}: {type(err).__name__} escaped instead of a ValueError naming {fields}: {err}")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nvalidation fuzz, calls per boundary:", {k: len(v) for k, v in sorted(SECONDS.items())},
          "total", sum(len(v) for v in SECONDS.values()))
    print("median / max ms:", {k: (round(1e3 * float(np.median(v)), 2), round(1e3 * max(v), 1))
                               for k, v in sorted(SECONDS.items())})


# --------------------------------------------------------------------------
# Value strategies.

NAN_INF = st.sampled_from([math.nan, math.inf, -math.inf])
NEGATIVE = st.one_of(st.integers(-(2**63), -1), st.floats(max_value=-1e-300, allow_infinity=True))
HUGE = st.integers(10**13, 10**30)  # allocation of such a size fails at once
WRONG_TYPE = st.one_of(
    st.text(max_size=8), st.none(), st.booleans(), st.lists(st.integers(-3, 40), max_size=3).map(tuple),
    st.dictionaries(st.text(st.characters(exclude_characters="."), max_size=3), st.integers(), max_size=2))
SMALL = st.one_of(st.integers(0, 40), st.floats(0, 2, allow_nan=False), st.sampled_from([0.5, 1.0, 1e-20]))
ANY_BAD = st.one_of(NAN_INF, NEGATIVE, HUGE, WRONG_TYPE, SMALL)


def _category(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (tuple, list)):
        return "sequence"
    return type(value).__name__


def _never_valid(path: str, base, value) -> bool:
    """Type or sign errors no field of the tiny config accepts (an int for a float is allowed)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            return True
    if value is None and path in OPTIONAL:
        return False
    if base is None:  # an optional field left at None: its type is not known here
        return False
    allowed = {"float": {"float", "int"}}.get(_category(base), {_category(base)})
    return _category(value) not in allowed


# --------------------------------------------------------------------------
# The experiment config (config_validation.validate_config).


def _load_config(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "experiments" / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


TINY = _load_config("tiny").to_dict()
# Fields the base config documents as optional (a None placeholder).
OPTIONAL = {f"{group}.{field}" for group, fields in _load_config("default").to_dict().items()
            for field, value in fields.items() if value is None}
LEAVES = sorted(f"{group}.{field}" for group, fields in TINY.items() for field in fields
                if not isinstance(fields[field], dict))
# A change of one field may make another one invalid; the message may name either.
COUPLED = {
    "data.dataset": ("data.image_size", "model.", "eval.split"),
    "data.image_size": ("model.ch_mult", "model.attn_resolutions"),
    "model.ch": ("model.num_groups",),
    "model.ch_mult": ("data.image_size", "model.attn_resolutions"),
    "diffusion.num_timesteps": ("sampling.num_steps", "eval.num_steps"),
    "diffusion.schedule": ("diffusion.schedule_kwargs",),
    "diffusion.variance": ("diffusion.loss_type", "sampling.variance"),
    "diffusion.loss_type": ("diffusion.variance",),
    "sampling.variance": ("sampling.eta",),
}


SCHEDULE_KWARGS = ["diffusion.schedule_kwargs.beta_start", "diffusion.schedule_kwargs.beta_end"]


def _with(tree: dict, path: str, value) -> ml_collections.ConfigDict:
    tree = copy.deepcopy(tree)
    *groups, field = path.split(".")
    node = tree
    for group in groups:
        node = node[group]
    node[field] = value
    return ml_collections.ConfigDict(tree)


def _base_value(path: str):
    group, *rest = path.split(".")
    return TINY[group].get(rest[0]) if len(rest) == 1 else None


def test_the_tiny_config_is_valid():
    with _boundary("validate_config"):
        config_validation.validate_config(ml_collections.ConfigDict(TINY), process_count=1, local_device_count=1)


# Explicit examples: inputs that broke validation once (docs/reliability.md, 'Known gaps').
@settings(FUZZ, max_examples=400)
@given(path=st.sampled_from(LEAVES + SCHEDULE_KWARGS), value=ANY_BAD)
@example(path="model.ch_mult", value=None)
@example(path="model.attn_resolutions", value="")
@example(path="diffusion.num_timesteps", value=3)
@example(path="diffusion.num_timesteps", value=10**13)
@example(path="diffusion.schedule_kwargs.beta_start", value=None)
@example(path="diffusion.schedule_kwargs.beta_start", value=1e-20)
def test_one_bad_config_field_is_named(path, value):
    config = _with(TINY, path, value)
    fields = (path,) + COUPLED.get(path, ())
    if path in SCHEDULE_KWARGS and _category(value) in ("int", "float"):
        fields += ("diffusion.schedule_kwargs",)  # an in-range β that underflows is a property of the β array
    with _boundary("validate_config"):
        accepted = _check_rejection(
            lambda: config_validation.validate_config(config, process_count=1, local_device_count=1) or True,
            fields, f"{path}={value!r}")
    assert not (accepted and _never_valid(path, _base_value(path), value)), f"{path}={value!r} was accepted"


@settings(FUZZ, max_examples=60)
@given(processes=st.integers(1, 4), local_devices=st.integers(1, 8))
def test_a_batch_that_does_not_split_over_the_devices_is_named(processes, local_devices):
    config = ml_collections.ConfigDict(TINY)
    batch = config.training.batch_size
    with _boundary("validate_config"):
        ok = _check_rejection(lambda: config_validation.validate_config(
            config, process_count=processes, local_device_count=local_devices) or True,
            ("training.batch_size",), f"{processes}x{local_devices} devices")
    assert bool(ok) == (batch % (processes * local_devices) == 0)


@settings(FUZZ, max_examples=40)
@given(group=st.sampled_from(sorted(TINY)), name=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
       drop=st.booleans())
def test_an_unknown_or_missing_field_is_named(group, name, drop):
    tree = copy.deepcopy(TINY)
    if drop:
        name = sorted(tree[group])[len(name) % len(tree[group])]
        del tree[group][name]
    elif name in tree[group]:
        return
    else:
        tree[group][name] = 1
    with _boundary("validate_config"):
        result = _check_rejection(lambda: config_validation.validate_config(
            ml_collections.ConfigDict(tree), process_count=1, local_device_count=1) or True,
            (f"{group}.{name}",), f"{'missing' if drop else 'unknown'} {group}.{name}")
    assert result is None


def test_a_bad_config_fails_before_training_compiles_or_writes_anything(tmp_path):
    """The top of the pipeline: train_and_evaluate rejects the config before any jit or file."""
    from ddpm_jax import train  # pylint: disable=import-outside-toplevel

    for path, value in [("training.batch_size", 0), ("model.num_groups", 3), ("data.image_size", 12),
                        ("diffusion.schedule", "cosinus"), ("training.lr", math.nan)]:
        config = _with(TINY, path, value)
        compiled = len(_COMPILES)
        with pytest.raises(ValueError, match=path.replace(".", r"\.")):
            train.train_and_evaluate(config, str(tmp_path / "run"))
        assert _COMPILES[compiled:] == []
        assert not (tmp_path / "run").exists()


def test_validation_takes_milliseconds():
    """200 bad configs: validation is host-side Python, so the median call is far below a compile (~0.1 s+)."""
    rng = np.random.default_rng(0)
    bad = [("training.batch_size", 0), ("model.num_groups", 3), ("diffusion.schedule", "cosinus"),
           ("training.lr", math.nan), ("sampling.num_steps", 10**6)]
    durations = []
    for path, value in (bad[i] for i in rng.integers(0, len(bad), 200)):
        config = _with(TINY, path, value)
        start = time.perf_counter()
        with pytest.raises(ValueError, match=path.replace(".", r"\.")):
            config_validation.validate_config(config, process_count=1, local_device_count=1)
        durations.append(time.perf_counter() - start)
    print(f"\nvalidate_config on bad configs: median {1e3 * np.median(durations):.2f} ms, "
          f"p90 {1e3 * np.quantile(durations, 0.9):.2f} ms")
    assert np.median(durations) < 0.02


# --------------------------------------------------------------------------
# The public math API.

SCHEDULE_ARGS = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "cosine": {"s": 0.008, "max_beta": 0.999},
    "quadratic": {"beta_start": 1e-4, "beta_end": 0.02},
    "sigmoid": {"beta_start": 1e-4, "beta_end": 0.02},
    "custom": {"betas": [0.01] * 50},
}


def _assert_sane_schedule(schedule: schedules.Schedule, what: str) -> None:
    for field, value in vars(schedule).items():
        assert np.all(np.isfinite(np.asarray(value))), f"{what}: accepted, but Schedule.{field} is not finite"
    betas = np.asarray(schedule.betas, np.float64)
    assert np.all((betas > 0) & (betas < 1)), f"{what}: accepted, but β is outside (0, 1)"


@settings(FUZZ, max_examples=150)
@given(name=st.sampled_from(sorted(SCHEDULE_ARGS)), field=st.sampled_from(["name", "num_timesteps", "kwarg"]),
       value=ANY_BAD, defaults=st.booleans(), which=st.integers(0, 1))
@example(name="linear", field="name", value=["linear"], defaults=True, which=0)
@example(name="cosine", field="kwarg", value=None, defaults=False, which=0)
@example(name="quadratic", field="kwarg", value=1e-20, defaults=False, which=1)
@example(name="custom", field="kwarg", value="abc", defaults=False, which=0)
def test_get_schedule_names_the_bad_argument(name, field, value, defaults, which):
    kwargs = dict(SCHEDULE_ARGS[name]) if name == "custom" or field == "kwarg" or not defaults else {}
    args = {"name": name, "num_timesteps": 50}
    if field == "kwarg":  # `which` picks the keyword
        field = sorted(kwargs)[which % len(kwargs)]
        kwargs[field] = value
    elif field == "num_timesteps" and isinstance(value, int) and value > 10**6:
        return  # a valid huge T would really allocate T-long arrays
    else:
        args[field] = value
    what = f"get_schedule({args}, {kwargs})"
    # A number that is in range but underflows (β = 1e-20) is a property of the whole β array.
    fields = (field, "betas") if _category(value) in ("int", "float") else (field,)
    with _boundary("get_schedule"):
        schedule = _check_rejection(lambda: schedules.get_schedule(args["name"], args["num_timesteps"], **kwargs),
                                    fields, what)
    if schedule is not None:
        _assert_sane_schedule(schedule, what)


def _valid_steps(steps, num_timesteps: int) -> bool:
    """Independent definition: a non-empty list of ints, strictly increasing, in [0, T-1]."""
    if not isinstance(steps, (list, tuple)) or not steps:
        return False
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in steps):
        return False
    return all(0 <= a < b < num_timesteps for a, b in zip(steps, steps[1:])) and 0 <= steps[0] < num_timesteps \
        and steps[-1] < num_timesteps


STEPS = st.one_of(
    st.lists(st.integers(-5, 60), max_size=6),
    st.lists(st.integers(0, 49), min_size=1, max_size=8, unique=True).map(sorted),
    st.lists(st.floats(-1, 60), max_size=4),
    st.lists(st.one_of(st.integers(0, 49), st.text(max_size=2), st.none()), min_size=1, max_size=3),
    WRONG_TYPE, HUGE.map(lambda h: [0, h]))
PARENT = schedules.get_schedule("linear", 50)


@settings(FUZZ, max_examples=100)
@given(steps=STEPS)
@example(steps=[0.5, 1.7])
@example(steps=None)
@example(steps=["3"])
def test_respace_accepts_only_valid_step_lists(steps):
    with _boundary("respace"):
        sub = _check_rejection(lambda: schedules.respace(PARENT, steps), ("steps",), f"respace(steps={steps!r})")
    assert (sub is not None) == _valid_steps(steps, 50), f"respace(steps={steps!r}) accepted={sub is not None}"
    if sub is not None:
        assert np.array_equal(np.asarray(sub.timesteps), steps)
        _assert_sane_schedule(sub, f"respace({steps!r})")


@settings(FUZZ, max_examples=100)
@given(num_timesteps=st.one_of(st.integers(1, 60), ANY_BAD), num_steps=st.one_of(st.integers(1, 60), ANY_BAD),
       kind=st.one_of(st.sampled_from(schedules.SPACINGS), WRONG_TYPE))
@example(num_timesteps=10, num_steps=3.5, kind="even")
@example(num_timesteps="10", num_steps=3, kind="even")
def test_space_timesteps_names_the_bad_argument(num_timesteps, num_steps, kind):
    what = f"space_timesteps({num_timesteps!r}, {num_steps!r}, {kind!r})"
    if isinstance(num_timesteps, int) and num_timesteps > 10**6 and isinstance(num_steps, int) and num_steps > 10**6:
        return  # both valid and huge: a real allocation
    with _boundary("space_timesteps"):
        steps = _check_rejection(lambda: schedules.space_timesteps(num_timesteps, num_steps, kind),
                                 ("num_timesteps", "num_steps", "kind"), what)
    valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (num_timesteps, num_steps)) \
        and isinstance(kind, str) and kind in schedules.SPACINGS and 1 <= num_steps <= num_timesteps
    if steps is not None:
        assert valid, f"{what} was accepted"
        assert len(steps) == num_steps and steps[0] == 0 and _valid_steps(list(steps), num_timesteps)


@settings(FUZZ, max_examples=60)
@given(loss_type=st.one_of(st.sampled_from(losses.LOSS_TYPES), WRONG_TYPE),
       variance=st.one_of(st.sampled_from(sorted(variances.VARIANCES)), WRONG_TYPE))
@example(loss_type="simple", variance="")
@example(loss_type="hybrid", variance=["learned"])
@example(loss_type="vlb", variance=variances.LEARNED_RANGE)
@example(loss_type="hybrid", variance=variances.FIXED_LARGE)
def test_validate_loss_type_accepts_only_compatible_names(loss_type, variance):
    with _boundary("validate_loss_type"):
        ok = _check_rejection(lambda: losses.validate_loss_type(loss_type, variance) or True,
                              ("loss_type", "variance"), f"({loss_type!r}, {variance!r})")
    # Independent: a σ record (or the name of a built-in one); L_vlb/L_hybrid train σ², so the network must output it.
    record = variance if isinstance(variance, variances.Variance) else (
        variances.VARIANCES.get(variance) if isinstance(variance, str) else None)
    learned = {"learned", "learned_range"}
    valid = record is not None and isinstance(loss_type, str) and (
        loss_type == "simple" or loss_type in losses.LOSS_TYPES and record.name in learned)
    assert bool(ok) == valid, f"validate_loss_type({loss_type!r}, {variance!r}) accepted={bool(ok)}"


class _Reached(Exception):
    """Raised by the model: validation let the call through to the sampler's computation."""


def _model_fn(x, t):
    raise _Reached


SAMPLE_ARGS = {"shape": (4, 8, 8, 1), "num_steps": None, "spacing": "even", "steps": None,
               "variance": None, "mean_type": "eps", "eta": None, "chunk_size": None}
MAX_SAMPLE_SIZE = 4096  # elements of x_T: a valid shape above it is skipped (a [1, 5, 10, ..., 49] list once took 24 GB)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _valid_sample_arg(field: str, value) -> bool:
    """Independent definition of each argument of sampling.sample, the others left at SAMPLE_ARGS (T = 50)."""
    if field == "rng":
        return False  # ANY_BAD and STEPS hold no PRNG key
    if field == "shape":
        return isinstance(value, (tuple, list)) and len(value) >= 2 and all(_is_int(d) and d >= 1 for d in value)
    if field == "num_steps":
        return value is None or _is_int(value) and 1 <= value <= 50
    if field == "steps":
        return value is None or _valid_steps(value, 50)
    if field == "spacing":
        return isinstance(value, str) and value in schedules.SPACINGS
    if field == "mean_type":
        return isinstance(value, str) and value in ("eps", "x0", "v")
    if field == "variance":  # the model outputs C channels: a σ² from the network is rejected after the call
        return value is None or isinstance(value, str) and value in variances.VARIANCES and value != "analytic"
    if field == "eta":
        return value is None or isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if field == "chunk_size":
        return value is None or _is_int(value) and value >= 1
    raise AssertionError(field)


# Seeded and bounded: derandomized examples, valid shapes capped at MAX_SAMPLE_SIZE elements, T = 50 steps.
@settings(FUZZ, max_examples=80)
@given(field=st.sampled_from(sorted(SAMPLE_ARGS) + ["rng"]), value=st.one_of(ANY_BAD, STEPS))
@example(field="variance", value=["fixed_small"])
@example(field="variance", value="fixed_large")
@example(field="variance", value="learned_range")
@example(field="steps", value=[0.5, 1.7])
@example(field="steps", value=[0, 7, 49])
@example(field="shape", value=[1, 5, 10, 20, 30, 40, 45, 49])
@example(field="shape", value=(2, 3))
@example(field="eta", value=0.0)
@example(field="num_steps", value=50)
@example(field="chunk_size", value=10**20)
def test_sample_names_the_bad_argument(field, value):
    kwargs = dict(SAMPLE_ARGS)
    rng = jax.random.PRNGKey(0)
    if field == "rng":
        rng = value
    else:
        kwargs[field] = value
    valid = _valid_sample_arg(field, value)
    if field == "shape" and valid and math.prod(value) > MAX_SAMPLE_SIZE:
        return  # a valid large shape would really allocate x_T
    shape = kwargs.pop("shape")
    what = f"sample({field}={value!r})"
    compiled = len(_COMPILES)
    start = time.perf_counter()
    try:
        sampling.sample(_model_fn, PARENT, rng, shape, **kwargs)
    except ValueError as err:
        assert not valid, f"{what} is valid but was rejected: {err}"
        assert field in str(err) or field == "steps" and "num_steps" in str(err), f"{what}: {err!r} does not name {field}"
        assert _COMPILES[compiled:] == [], f"{what} compiled before rejecting"
        SECONDS.setdefault("sampling.sample", []).append(time.perf_counter() - start)
    except _Reached:
        assert valid, f"{what} is invalid but reached the model"
    except Exception as err:  # pylint: disable=broad-except
        pytest.fail(f"{what}: {type(err).__name__} escaped: {err}")
    else:
        pytest.fail(f"{what}: returned without calling the model")


DATA = st.one_of(
    st.tuples(st.integers(1, 4), st.sampled_from([-1.5, 1.0001, 2.0, -255.0, 255.0, math.nan, math.inf])).map(
        lambda nv: np.concatenate([np.zeros((nv[0], 4, 4, 1), np.float32),
                                   np.full((1, 4, 4, 1), nv[1], np.float32)])),
    st.sampled_from([np.zeros((4,), np.float32), np.zeros((), np.float32), np.zeros((0, 4, 4, 1), np.float32)]),
    WRONG_TYPE)


@settings(FUZZ, max_examples=60)
@given(data=DATA, public=st.sampled_from(["nll_bpd", "estimate_gamma"]))
@example(data="abc", public="nll_bpd")
@example(data={}, public="estimate_gamma")
def test_data_outside_the_unit_interval_is_rejected_by_the_evaluation_api(data, public):
    identity = lambda x, t: x  # noqa: E731  never called: the data is always invalid
    call = {"nll_bpd": lambda: nll.nll_bpd(identity, PARENT, data, jax.random.PRNGKey(0), variance="fixed_small"),
            "estimate_gamma": lambda: nll.estimate_gamma(identity, PARENT, data, jax.random.PRNGKey(0))}[public]
    with _boundary(public):
        result = _check_rejection(call, ("data",), f"{public}(data={data!r})")
    assert result is None, f"{public} accepted invalid data {data!r}"


def test_a_variance_naming_a_missing_module_is_a_value_error():
    with pytest.raises(ValueError, match="variance"):
        variances.get("no_such_module:SIGMA")
