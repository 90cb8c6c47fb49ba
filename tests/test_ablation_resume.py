"""The σ_t ablation survives preemption, reuses its statistics, and spreads over processes.

The oracle is an uninterrupted run of `python -m experiments.sigma_ablation` on the tiny
ablation config and the random checkpoint of test_ablation.py (`reference`). A run stopped by
SIGTERM, then killed by SIGKILL, each at seeded random points, and rerun with the same command
must end with the same per_seed.csv, results.csv and results.md, to the character, apart from
the timing fields (sample_time_s, compile_time_s) and the wall-time/date line. A second run on
the same checkpoint must read Γ_t and the pair costs from the cache, and 2 processes (gloo on
127.0.0.1, 1 device each) must reproduce 1 process with 2 devices.
Every run shares the persistent XLA cache of tests/_runs.py (the pair runs without it, see
test_multiprocess.py), with XLA's CPU optimisations off as in test_ablation.py.
"""

from __future__ import annotations

import csv
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _runs import Run, free_port, subprocess_env
from test_ablation import _save_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "ablation_tiny.py"
SEED = 16  # draws the signal points
TIMEOUT = 420  # s for one run on a loaded 2-core machine
TIMING = ("sample_time_s", "compile_time_s")
CELL_FILE = re.compile(r"^(bound_.*\.npz|sample_.*\.json)$")


def _env(num_devices: int = 1, cache: bool = True) -> dict:
    env = subprocess_env(num_devices)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["DDPM_JAX_COMPILATION_CACHE"] = env["JAX_COMPILATION_CACHE_DIR"] if cache else "off"
    if not cache:
        del env["JAX_COMPILATION_CACHE_DIR"]
    return env


def _command(workdir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.sigma_ablation", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.output_dir={out}", f"--config.cache_dir={cache}", *extra]


def _run(args: list[str], env: dict, log: Path) -> str:
    process = Run(args, env, log)
    code = process.wait(TIMEOUT)
    assert code == 0, process.output()[-3000:]
    return process.output()


def _cells(out: Path) -> int:
    directory = out / "cells"
    return sum(1 for p in directory.iterdir() if CELL_FILE.match(p.name)) if directory.exists() else 0


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in csv.DictReader(f)]


def _markdown(path: Path) -> list[str]:
    """results.md without the wall-time/date line and the sampling-time column."""
    lines = [l for l in path.read_text(encoding="utf-8").splitlines() if "total wall time" not in l]
    header = next(l for l in lines if l.startswith("| σ choice"))
    drop = header.split(" | ").index("sampling time (s)") if "sampling time (s)" in header else None
    if drop is not None:
        lines = [" | ".join(c for i, c in enumerate(l.split(" | ")) if i != drop) if l.startswith("| ") else l
                 for l in lines]
    return lines


def _tables(out: Path) -> dict:
    return {"per_seed.csv": _csv(out / "per_seed.csv"), "results.csv": _csv(out / "results.csv"),
            "results.md": _markdown(out / "results.md")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablation_resume")
    _save_random_checkpoint(workdir)
    return workdir


@pytest.fixture(scope="module")
def reference(workdir):
    """(output dir, log) of the uninterrupted run; its cache is workdir/cache."""
    out = workdir / "reference"
    start = time.monotonic()
    log = _run(_command(workdir, out, workdir / "cache"), _env(), workdir / "reference.log")
    print(f"\nreference run: {_cells(out)} cells in {time.monotonic() - start:.0f} s")
    return out, log


def _wait_for_cells(process: Run, out: Path, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _cells(out) < count:
        assert process.proc.poll() is None, f"exited ({process.proc.returncode}) early:\n{process.output()[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {count} cells within {TIMEOUT} s"
        time.sleep(0.01)


@pytest.mark.slow  # ~35 s beyond the shared fixtures on 2 cores
def test_sigterm_and_sigkill_then_rerun_give_the_uninterrupted_tables(workdir, reference, tmp_path):
    ref_out, _ = reference
    total = _cells(ref_out)
    rng = random.Random(SEED)
    out, cache, env = tmp_path / "out", tmp_path / "cache", _env()
    command = _command(workdir, out, cache)

    # SIGTERM once a random number of cells is finished: the current cell is finished, exit 0.
    term_at = rng.randint(1, total // 3)
    process = Run(command, env, tmp_path / "term.log")
    _wait_for_cells(process, out, term_at)
    process.proc.send_signal(signal.SIGTERM)
    assert process.wait(TIMEOUT) == 0, process.output()[-3000:]
    after_term = _cells(out)
    assert "stopping after" in process.output() and term_at <= after_term < total

    # SIGKILL a random time into a later cell: at most that cell is lost.
    kill_at = rng.randint(after_term + 1, (after_term + total) // 2)
    process = Run(command, env, tmp_path / "kill.log")
    _wait_for_cells(process, out, kill_at)
    time.sleep(rng.uniform(0.0, 0.5))
    process.proc.kill()
    process.close()
    after_kill = _cells(out)
    assert re.search(rf"\b{total} cells, {after_term} already done", process.output())

    log = _run(command, env, tmp_path / "resume.log")
    assert re.search(rf"\b{total} cells, {after_kill} already done, {total - after_kill} to run", log)
    assert not list(out.rglob("*.tmp.*")), "a killed writer's temporary file was left"
    assert _tables(out) == _tables(ref_out)
    # Γ_t was computed once (by the first run) and read back by the two reruns.
    assert "Computed statistics" in (tmp_path / "term.log").read_text(encoding="utf-8")
    assert "Reused statistics" in log and "Computed statistics" not in log
    print(f"\nkill/resume: {total} cells; SIGTERM at >= {term_at} -> {after_term} kept; SIGKILL at >= {kill_at} -> "
          f"{after_kill} kept; the rerun computed {total - after_kill}; tables equal")

    # A finished run rerun: nothing to do, the same tables again.
    log = _run(command, env, tmp_path / "again.log")
    assert re.search(rf"\b{total} cells, {total} already done, 0 to run", log)
    assert _tables(out) == _tables(ref_out)


def _seconds(log: str, kind: str) -> float:
    return sum(float(s) for s in re.findall(rf"(?:Computed|Reused) {kind}\S* (?:in |from \S+ \()([0-9.]+) s", log))


@pytest.mark.slow  # ~30 s with the module's ablation fixtures on 2 cores
def test_a_changed_config_is_refused_then_reuses_the_cached_statistics(workdir, reference):
    ref_out, ref_log = reference
    one_seed = _command(workdir, ref_out, workdir / "cache", "--config.seeds=(0,)")
    process = Run(one_seed, _env(), workdir / "refused.log")
    assert process.wait(TIMEOUT) != 0
    assert "changed: config.seeds" in process.output()

    log = _run(one_seed + ["--new_output_dir"], _env(), workdir / "one_seed.log")
    new_out = Path(f"{ref_out}_1")
    assert "Reused statistics" in log and "Computed statistics" not in log
    assert "Reused pair_costs_analytic" in log and "Computed pair_costs" not in log
    # The digits classifier and the reference features of the quality metric too (FDD/KID/IS equal below).
    assert "Computed digits_reference" in ref_log and "Reused digits_reference" in log
    assert "Computed digits_reference" not in log
    expected = [r for r in _csv(ref_out / "per_seed.csv") if r["seed"] == "0"]
    assert _csv(new_out / "per_seed.csv") == expected
    print(f"\nstatistics and pair costs: computed in {_seconds(ref_log, 'statistics') + _seconds(ref_log, 'pair_costs'):.2f} s, "
          f"reused in {_seconds(log, 'statistics') + _seconds(log, 'pair_costs'):.2f} s")


@pytest.mark.slow
def test_two_processes_match_one_process(workdir, tmp_path):
    """2 processes x 1 device against 1 process x 2 devices: the same per-device programs (batch of 8 samples,
    bound batches of 8 images), so samples and bounds must agree to the bit."""
    fields = ["--config.nll.batch_size=8"]
    single = tmp_path / "single"
    _run(_command(workdir, single, tmp_path / "cache_single", *fields), dict(_env(2), PJRT_NPROC="2"),
         tmp_path / "single.log")
    port = free_port()
    env = dict(_env(1, cache=False), PJRT_NPROC="2", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    multi = tmp_path / "multi"
    processes = [Run(_command(workdir, multi, tmp_path / "cache_multi", *fields, "--multihost", "--num_processes=2",
                              f"--process_id={i}", f"--coordinator_address=127.0.0.1:{port}"), env,
                     tmp_path / f"process_{i}.log") for i in range(2)]
    codes = [p.wait(TIMEOUT) for p in processes]
    assert codes == [0, 0], "\n\n".join(p.output()[-2500:] for p in processes)
    assert _tables(multi) == _tables(single)
    worst = {}
    for name in sorted(p.name for p in (single / "cells").iterdir() if p.suffix == ".npz"):
        a, b = (dict(np.load(d / "cells" / name)) for d in (single, multi))
        assert a.keys() == b.keys()
        for key in a:
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(a[key].astype(np.float64) - b[key]))))
    samples = max(v for k, v in worst.items() if k.startswith("grid_"))
    bounds = max(v for k, v in worst.items() if k.startswith("bound_"))
    print(f"\n2 processes vs 1: max |diff| samples (grids) {samples}, per-image bounds {bounds}")
    assert samples == 0.0 and bounds == 0.0
