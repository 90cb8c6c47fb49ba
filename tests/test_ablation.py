"""End-to-end test of the σ_t ablation command (python -m experiments.sigma_ablation) at tiny size, and its pieces.

A one-level UNet of the tiny config's shape (experiments/configs/tiny.py with
ch_mult=(1,)) with random N(0, 0.1²) weights is saved as a checkpoint; the command runs the
tiny ablation config on it in a subprocess, exactly as a user would, with XLA's
CPU optimisations off: compilation, not computation, is what takes time here. The report is checked against the per-seed records
recomputed in NumPy and against the settings the config asks for.
"""

import csv
import dataclasses
import functools
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import checkpoints, from_config, train, variances
from experiments.sigma_ablation import report as ablation_report
from experiments.sigma_ablation import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_config(name):
    return from_config.load_config_file(f"{name}.py")


def _save_random_checkpoint(workdir):
    """Saves a state of the tiny config's shapes: zeros, and N(0, 0.1²) EMA weights (NumPy: no compilation)."""
    config = _load_config("tiny")
    config.model.ch_mult = (1,)
    abstract = jax.eval_shape(functools.partial(train.create_train_state, config), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ema = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract.ema_params)
    rest = {f.name: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), getattr(abstract, f.name))
            for f in dataclasses.fields(abstract) if f.name != "ema_params"}
    manager = checkpoints.make_manager(str(workdir))
    checkpoints.save(manager, 1, rest, ema, checkpoints.run_metadata(config))
    manager.wait_until_finished()
    manager.close()


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _float(cell):
    return float(cell) if cell != "" else math.nan


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    _save_random_checkpoint(workdir)
    out = workdir / "ablation"
    command = [sys.executable, "-m", "experiments.sigma_ablation",
               f"--config={ROOT / 'experiments' / 'configs' / 'ablation_tiny.py'}", f"--workdir={workdir}",
               f"--config.output_dir={out}"]
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_report_has_one_row_per_setting_and_k(report):
    rows = _read_csv(report / "results.csv")
    # learned_range is skipped: the tiny model was trained with a fixed variance. geometric is the
    # README's own σ (experiments/custom_sigma.py), given by 'file:NAME' in the config.
    # Optimal trajectories exist for analytic and geometric (σ² a function of the chain), not DDIM η = 0.
    expected = {(s, "even", k) for s in ("analytic", "geometric", "ddim_eta0") for k in (2, 5)}
    expected |= {(s, "optimal", k) for s in ("analytic", "geometric") for k in (2, 5)}
    assert {(r["setting"], r["spacing"], int(r["K"])) for r in rows} == expected
    for row in rows:
        assert int(row["num_seeds"]) == 2 and int(row["num_samples"]) == 16
        for metric in ("fdd", "kid", "digits_is", "sample_time_s"):
            assert math.isfinite(_float(row[f"{metric}_mean"])) and math.isfinite(_float(row[f"{metric}_std"]))
        assert _float(row["sample_time_s_mean"]) > 0.0
        assert 1.0 <= _float(row["digits_is_mean"]) <= 10.0  # IS over 10 classes
        bound = _float(row["nll_bpd_mean"])
        if row["setting"] == "ddim_eta0":
            assert math.isnan(bound) and "no bound" in row["note"]
        else:
            # A random network's bound is huge at K = 2, but positive and finite.
            assert 0.0 < bound < math.inf and int(row["nll_examples"]) == 16


def test_rows_are_the_mean_and_std_of_the_per_seed_records(report):
    rows = _read_csv(report / "results.csv")
    records = _read_csv(report / "per_seed.csv")
    for row in rows:
        group = [r for r in records if (r["setting"], r["spacing"], r["K"]) == (row["setting"], row["spacing"], row["K"])]
        assert sorted(int(r["seed"]) for r in group) == [0, 1]
        for metric in ("nll_bpd", "fdd", "kid"):
            values = np.array([_float(r.get(metric, "")) for r in group])
            if np.all(np.isnan(values)):
                continue
            np.testing.assert_allclose(_float(row[f"{metric}_mean"]), values.mean(), rtol=1e-9)
            np.testing.assert_allclose(_float(row[f"{metric}_std"]), values.std(ddof=1), rtol=1e-9)


def test_markdown_plots_and_grids_are_written(report):
    table = (report / "results.md").read_text(encoding="utf-8")
    assert table.count("| analytic | even |") == 2 and table.count("| geometric | optimal |") == 2
    assert "Δ bound vs analytic" in table
    assert "ddim_eta0 [1]" in table and "[1] ddim_eta0:" in table and "decoder-step variance 'full_chain'" in table
    for name in ("nll_vs_k.png", "quality_vs_k.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (report / "grids").glob("*.png")) == [
        "analytic_K2.png", "analytic_K5.png", "analytic_optimal_K2.png", "analytic_optimal_K5.png", "data_test.png",
        "ddim_eta0_K2.png", "ddim_eta0_K5.png", "geometric_K2.png", "geometric_K5.png", "geometric_optimal_K2.png",
        "geometric_optimal_K5.png"]


def test_sigma_choices_keep_only_the_trained_learned_variance_and_explain_ddim():
    config = _load_config("ablation_tiny")
    config.variances, config.ddim_etas = ("fixed_small", "learned_range"), (0.0, 0.5, 1.0)
    names = [c.name for c in settings.sigma_choices(config, variances.FIXED_LARGE)]
    assert names == ["fixed_small", "ddim_eta0", "ddim_eta0.5", "ddim_eta1"]
    config.variances, config.ddim_etas = ("learned_range",), (1.0,)
    choices = settings.sigma_choices(config, variances.LEARNED_RANGE)
    assert [(c.name, c.has_bound) for c in choices] == [("learned_range", True), ("ddim_eta1", True)]
    assert [variances.ddim(eta).has_bound for eta in (0.0, 0.5, 1.0)] == [False, True, True]  # 0<η: q_σ bound


@pytest.mark.parametrize("field, value, message", [
    ("variances", ("fixed_large", "big"), "variance must be one of"),
    ("variances", ("fixed_large", "fixed_large"), "variances must be distinct"),
    ("spacings", ("even", "linear"), "spacings must be a non-empty tuple"),
    ("reference", "fixed_medium", r"reference must be .. \(none\) or one of"),
    ("num_steps", (10, 2000), "num_steps must be"),
    ("ddim_etas", (1.5,), "ddim_etas must be"),
])
def test_validate_config_names_the_bad_field(field, value, message):
    config = _load_config("ablation_tiny")
    with config.unlocked():
        config[field] = value
    with pytest.raises(ValueError, match=message):
        settings.validate_config(config, num_timesteps=1000)


def test_validate_config_accepts_zero_samples_but_not_one():
    config = _load_config("ablation_tiny")
    config.sample.num_samples = 0  # the bound only
    settings.validate_config(config, num_timesteps=1000)
    config.sample.num_samples = 1
    with pytest.raises(ValueError, match="sample.num_samples must be 0"):
        settings.validate_config(config, num_timesteps=1000)


def test_markdown_rounds_to_the_second_significant_digit_of_the_std():
    records = [dict(setting="analytic", eta=None, spacing="even", K=10, seed=s, num_samples=4, note="",
                    compile_time_s=1.0, nll_bpd=v, nll_stderr=se, nll_examples=8, fdd=f)
               for s, v, se, f in ((0, 7.2920, 0.012, 160.0), (1, 7.2964, 0.014, 182.6))]
    rows = ablation_report.aggregate(records)
    # std(7.2920, 7.2964) = 0.0031, mean s.e. 0.013, std(160, 182.6) = 16.
    assert "| analytic | 10 | 7.2942 ± 0.0031 | 0.013 | 171 ± 16 |" in ablation_report.markdown_table(rows)


def test_records_survive_the_csv_round_trip(tmp_path):
    records = [dict(setting="ddim_eta0.5", eta=0.5, spacing="uniform", K=10, seed=1, num_samples=4,
                    sample_time_s=0.25, decoder="full_chain", note="why, with a comma"),
               dict(setting="analytic", eta=None, spacing="even", K=25, seed=0, num_samples=4, decoder="own",
                    sample_time_s=0.5, nll_bpd=6.125, nll_stderr=0.0125, nll_examples=297, note="")]
    ablation_report.write_csv(records, str(tmp_path / "per_seed.csv"))
    assert ablation_report.read_records(str(tmp_path / "per_seed.csv")) == records


def _toy_eps(w, x_t, t):
    """A stand-in ε_θ: a fixed linear map of x_t plus a t-dependent shift (no compilation of a UNet)."""
    return 0.3 * x_t * w + 0.01 * t[:, None, None, None].astype(x_t.dtype)


def test_sigma_choices_of_one_structure_share_a_compiled_sampler_and_match_sampling_sample():
    from jax.tree_util import Partial

    from ddpm_jax import sampling, schedules
    from experiments.sigma_ablation import runner
    config = from_config.load_config_file(str(ROOT / "experiments" / "configs" / "ablation_tiny.py"))
    schedule = schedules.get_schedule("linear", 100)
    model_fn = Partial(_toy_eps, np.float32(0.9))
    kept = schedules.kept_steps(schedule.num_timesteps, num_steps=10)
    shape = (4, 8, 8, 1)
    large, small, ddim = (variances.get(n) for n in ("fixed_large", "fixed_small", "ddim_eta0.5"))
    assert runner.sampler_structure(large, kept) == runner.sampler_structure(small, kept)
    assert runner.sampler_structure(large, kept) != runner.sampler_structure(ddim, kept)
    assert runner.sampler_structure(large, kept) != runner.sampler_structure(large, kept[::2])
    prepared = {r.name: runner.prepare_chain(schedule, r, kept, config=config, stats={}) for r in (large, small)}
    resolved = {name: r for name, (_, r) in prepared.items()}
    compiled, _ = runner.compile_sampler(model_fn, *prepared["fixed_large"], shape, config=config, mean_type="eps")
    rng = jax.random.PRNGKey(3)
    outputs = {}
    for name, r in resolved.items():  # one program, each choice's σ² as arguments
        outputs[name] = np.asarray(compiled(model_fn, rng, np.int32(0), r.variance, r.log_variance))
        direct = sampling.sample(model_fn, schedule, rng, shape, steps=kept, variance=name,
                                 decoder=runner.decoder_of(config), clip_x0=config.sample.clip_x0)
        np.testing.assert_allclose(outputs[name], np.asarray(direct), rtol=1e-5, atol=1e-6)
    assert np.abs(outputs["fixed_large"] - outputs["fixed_small"]).max() > 1e-3  # σ² is read, not frozen
