"""Multi-process data parallelism on one machine: 2 processes x 2 CPU devices against 1 process x 4.

Both runs train the tiny config (one UNet level) for a few steps. The processes
join with jax.distributed.initialize on 127.0.0.1 and talk over gloo; the single
process reduces in memory. The data pipeline gives every process its rows of
the same global batches and every random draw is per global example, so:

- with training.ordered_allreduce (an all-gather and one sum in device order)
  the two runs must be bit-identical;
- with the default all-reduce (lax.pmean) only its summation order differs
  (gloo's ring across processes, in memory within one): the parameters must
  agree within TOLERANCE (measured 6.0e-8 after 3 steps).

Every process gets the same XLA CPU thread-pool size (PJRT_NPROC): the CPU client
sizes its pool max(cores, local devices), and the pool size decides how XLA
splits loops over threads (`outer_dimension_partitions`), which changes the
rounding of some reductions. Without it, 1 process x 4 devices on a 2-core
machine runs other per-device programs than 2 processes x 2 devices (measured:
the conv_out kernel gradient differed by 1.2e-7 before any all-reduce).
It runs in CI: about 1 min per case on 2 cores (the pair compiles without the
persistent cache, see below).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _runs import TINY, WORKER, Run, free_port, metrics, subprocess_env

STEPS = 3
NPROC = "4"  # XLA CPU thread-pool size of every process (see above)
TIMEOUT = 420  # s for the whole test, on a loaded 2-core machine with a cold cache
TOLERANCE = 1e-6


def _args(workdir: Path, out: Path, ordered: bool, *extra: str) -> list[str]:
    # One UNet level instead of two: the property does not depend on the model, and the
    # pair's compilation (uncached, see below) is most of this test's time.
    fields = {"model.ch_mult": (1,), "training.num_train_steps": STEPS, "training.log_every": 1,
              "training.save_every": STEPS, "training.ordered_allreduce": ordered}
    return [sys.executable, str(WORKER), f"--config={TINY}", f"--workdir={workdir}", f"--out={out}",
            *(f"--set={k}={v!r}" for k, v in fields.items()), *extra]


def _run_all(commands: list[tuple[list[str], dict]], logs: list[Path], deadline: float) -> list[int | None]:
    """Runs the commands at once until all exit; on a failure or the deadline the rest are killed.

    A failed process of a distributed job may hang in its exit handlers waiting for its peers,
    so a traceback in any log counts as a failure.
    """
    processes = [Run(args, env, log) for (args, env), log in zip(commands, logs)]
    try:
        while any(p.proc.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.proc.poll() not in (None, 0) or "Traceback (most recent call last)" in p.output()
                   for p in processes):
                break
            time.sleep(0.5)
    finally:
        for p in processes:
            p.close()
    return [p.proc.returncode for p in processes]


# The ordered all-reduce across processes is slow-marked (~40 s on 2 cores) to keep the default suite
# short (7 min on 2 cores); test_train.py checks both all-reduces on 8 devices in one process by default.
@pytest.mark.parametrize("ordered", [pytest.param(True, marks=pytest.mark.slow), False],
                         ids=["ordered_allreduce", "pmean"])
def test_two_processes_match_one_process_with_the_same_devices(tmp_path, ordered):
    start = time.monotonic()
    outs = [tmp_path / f"process_{i}.npz" for i in range(2)] + [tmp_path / "single.npz"]
    logs = [tmp_path / f"{name}.log" for name in ("process_0", "process_1", "single")]
    codes = _run_all([(_args(tmp_path / "single", outs[2], ordered), dict(subprocess_env(4), PJRT_NPROC=NPROC))],
                     logs[2:], start + TIMEOUT)
    # The pair compiles without the persistent cache: JAX writes it from process 0 only, so
    # process 1 would compile alone while process 0 waits at the first all-reduce, and gloo's
    # rendezvous gives up after 30 s.
    pair_env = {k: v for k, v in subprocess_env(2).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    pair_env["PJRT_NPROC"] = NPROC
    port = free_port()
    codes = _run_all([(_args(tmp_path / "multi", outs[i], ordered, f"--process_id={i}", "--num_processes=2",
                             f"--coordinator=127.0.0.1:{port}"), pair_env) for i in range(2)],
                     logs[:2], start + TIMEOUT) + codes
    seconds = time.monotonic() - start
    assert codes == [0, 0, 0], "\n\n".join(f"{log.name}:\n{log.read_text()[-2500:]}" for log in logs)

    first, second, single = (dict(np.load(out)) for out in outs)
    assert first.keys() == single.keys() and int(single[".step"]) == STEPS
    # Every process holds the same replicated state.
    assert all(np.array_equal(first[k], second[k]) for k in first)
    errors = {k: float(np.max(np.abs(first[k].astype(np.float64) - single[k]))) for k in single}
    worst = max(errors, key=errors.get)
    identical = all(first[k].tobytes() == single[k].tobytes() for k in single)
    by_group = {group: max(v for k, v in errors.items() if k.startswith(f".{group}"))
                for group in ("params", "ema_params", "opt_state")}
    print(f"\nmultiprocess ({'ordered_allreduce' if ordered else 'pmean'}): 2x2 vs 1x4 devices, {STEPS} steps, "
          f"{len(single)} arrays: bit-identical={identical}, max |diff| {by_group} (worst {worst}), {seconds:.0f} s")
    if ordered:
        assert identical, f"{worst} differs by {errors[worst]}"
    assert errors[worst] <= TOLERANCE, f"{worst} differs by {errors[worst]}"
    # Every step was applied (finite, non-zero gradient) and both runs saw the same losses:
    # the comparison is between two trainings, not two initialisations.
    rows = {name: metrics(tmp_path / name) for name in ("multi", "single")}
    assert [r["step"] for r in rows["multi"]] == [r["step"] for r in rows["single"]] == list(range(1, STEPS + 1))
    for multi_row, single_row in zip(rows["multi"], rows["single"]):
        assert multi_row["skipped"] == 0 and multi_row["grad_norm"] > 0
        assert abs(multi_row["loss"] - single_row["loss"]) <= TOLERANCE
        if ordered:  # every logged training quantity, to the bit (not the timings)
            timings = ("steps_per_sec", "images_per_sec")
            assert {k: v for k, v in multi_row.items() if k not in timings} == \
                {k: v for k, v in single_row.items() if k not in timings}
    # Step 1 starts from the same parameters on the same global batch: the same loss, to the bit.
    assert rows["multi"][0]["loss"] == rows["single"][0]["loss"]
    # Process 0 wrote the multi-process run's checkpoint of the final step.
    assert (tmp_path / "multi" / "checkpoints" / str(STEPS)).is_dir()
