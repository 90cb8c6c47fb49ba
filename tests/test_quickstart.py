"""The quickstart's self-check (scripts/quickstart.py): a run's table against the committed reference."""

import csv
import pathlib

import pytest

from experiments.sigma_ablation import report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


ROWS = [dict(setting="analytic", spacing="even", K="10", nll_bpd_mean="6.25", fdd_mean="33.3", sample_time_s_mean="2.2"),
        dict(setting="ddim_eta0", spacing="even", K="10", nll_bpd_mean="", fdd_mean="19.8", sample_time_s_mean="2.3")]


def test_the_committed_reference_is_reproduced_by_itself_and_timings_do_not_count(tmp_path):
    quickstart = report
    _write(tmp_path / "ref.csv", ROWS)
    run = [dict(r, sample_time_s_mean="9.9") for r in ROWS]
    run[0]["nll_bpd_mean"] = "6.2500001"
    _write(tmp_path / "run.csv", run)
    reproduced, largest, problems = quickstart.compare_tables(str(tmp_path / "run.csv"), str(tmp_path / "ref.csv"), 1e-3)
    assert reproduced and problems == [] and largest == pytest.approx(0.0000001 / 6.25)


def test_a_changed_number_a_missing_row_and_a_new_bound_are_named(tmp_path):
    quickstart = report
    _write(tmp_path / "ref.csv", ROWS)
    run = [dict(ROWS[0], fdd_mean="35.0"), dict(ROWS[1], nll_bpd_mean="7.0"),
           dict(ROWS[1], K="25")]
    _write(tmp_path / "run.csv", run)
    reproduced, _, problems = quickstart.compare_tables(str(tmp_path / "run.csv"), str(tmp_path / "ref.csv"), 1e-3)
    assert not reproduced
    assert any("fdd_mean: reference 33.3, run 35" in p for p in problems)
    assert any("nll_bpd_mean: reference empty, run 7.0" in p for p in problems)
    assert any("('ddim_eta0', 'even', '25') is not in the reference" in p for p in problems)


def test_a_spread_is_compared_on_the_scale_of_its_mean(tmp_path):
    # Two seeds 5.0 and 5.2: std = 0.2/√2. Each seed moved by 2e-4 relative (within rtol 1e-3)
    # moves the std by 1.0% of itself, but by only 2.8e-4 of the mean: reproduced.
    seeds = lambda a, b: dict(digits_is_mean=f"{(a + b) / 2!r}", digits_is_std=f"{abs(a - b) / 2 ** 0.5!r}")
    ref = [dict(ROWS[0], **seeds(5.0, 5.2))]
    _write(tmp_path / "ref.csv", ref)
    _write(tmp_path / "run.csv", [dict(ROWS[0], **seeds(5.0 * (1 - 2e-4), 5.2 * (1 + 2e-4)))])
    reproduced, largest, problems = report.compare_tables(str(tmp_path / "run.csv"), str(tmp_path / "ref.csv"), 1e-3)
    assert reproduced and problems == [], problems
    assert largest == pytest.approx((5.2 * 2e-4 + 5.0 * 2e-4) / 2 ** 0.5 / 5.1, rel=1e-6)
    # Measured against the std itself the same run is 1.0% off: the old rule would have refused it.
    assert largest * 5.1 / (0.2 / 2 ** 0.5) > 1e-3
    # A spread that moved by more than rtol of its mean is a difference, named with its column.
    _write(tmp_path / "run.csv", [dict(ROWS[0], digits_is_mean=ref[0]["digits_is_mean"], digits_is_std="0.3")])
    reproduced, _, problems = report.compare_tables(str(tmp_path / "run.csv"), str(tmp_path / "ref.csv"), 1e-3)
    assert not reproduced and len(problems) == 1 and "digits_is_std" in problems[0]
    # A spread without its mean column keeps the plain relative rule.
    _write(tmp_path / "ref.csv", [dict(ROWS[0], fdd_mean="", fdd_std="0.5")])
    _write(tmp_path / "run.csv", [dict(ROWS[0], fdd_mean="", fdd_std="0.5006")])
    reproduced, _, problems = report.compare_tables(str(tmp_path / "run.csv"), str(tmp_path / "ref.csv"), 1e-3)
    assert not reproduced and "fdd_std" in problems[0]
