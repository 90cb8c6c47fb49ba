"""Helpers for tests that run training in subprocesses (test_reliability, test_multiprocess); not a test module.

Every subprocess gets the same environment: CPU only, this checkout on
PYTHONPATH, and one persistent XLA compilation cache shared by all runs (and
kept between sessions under the system temp dir, or $DDPM_JAX_TEST_XLA_CACHE),
so that only the first run of a program pays its compilation. A cached
executable is the same program, so bit-for-bit comparisons are unaffected.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm_jax import checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "configs" / "tiny.py"
WORKER = REPO / "tests" / "_train_worker.py"
RUN_TIMEOUT = 300  # s for one training subprocess; the first one on a cold cache compiles (~1 min on 2 cores)


def subprocess_env(num_devices: int = 1) -> dict[str, str]:
    cache = os.environ.get("DDPM_JAX_TEST_XLA_CACHE",
                           os.path.join(tempfile.gettempdir(), f"ddpm_jax_test_xla_cache_{jax.__version__}"))
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """A subprocess whose stdout+stderr go to a file (no pipe to fill up); killed on close if still running."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self._file = open(log, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=self._file, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._file.close()

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def run(args: list[str], env: dict, log: Path) -> tuple[int, str]:
    """Runs to completion (or RUN_TIMEOUT); returns (exit code, output)."""
    process = Run(args, env, log)
    code = process.wait()
    return code, process.output()


def metrics(workdir: Path) -> list[dict]:
    """The complete rows of workdir/metrics.jsonl (the writer may be mid-line)."""
    path = workdir / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def logged_steps(workdir: Path) -> list[int]:
    return [row["step"] for row in metrics(workdir)]


def wait_for_step(process: Run, workdir: Path, step: int, timeout: float = RUN_TIMEOUT) -> int:
    """Polls metrics.jsonl every 5 ms until it shows a step >= `step`; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(workdir)
        if steps and steps[-1] >= step:
            return steps[-1]
        if process.proc.poll() is not None:
            pytest.fail(f"training exited ({process.proc.returncode}) before step {step}:\n{process.output()[-3000:]}")
        time.sleep(0.005)
    process.close()
    pytest.fail(f"no step >= {step} logged within {timeout} s")


def saved_steps(workdir: Path) -> list[int]:
    """Finished checkpoint steps (Orbax renames <step>.orbax-checkpoint-tmp-* to <step> when complete)."""
    directory = workdir / checkpoints.CHECKPOINT_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def tmp_dirs(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / checkpoints.CHECKPOINT_DIR).glob("*.orbax-checkpoint-tmp*"))


def largest_data_file(step_dir: Path, item: str = "state") -> Path:
    """The biggest array-data file (OCDBT `d/` chunk) of one item of a checkpoint."""
    files = [Path(p) for p in glob.glob(str(step_dir / item / "**" / "d" / "*"), recursive=True)]
    return max(files, key=lambda p: p.stat().st_size)


def load_checkpoint(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of checkpoint `step` (state and EMA), keyed by tree path, read with Orbax directly."""
    manager = checkpoints.make_manager(str(workdir), read_only=True)
    try:
        meta = manager.item_metadata(step)
        target = {item: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta[item],
                                     is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
                  for item in ("state", "ema_params")}
        restored = manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(tree) for item, tree in target.items()}))
    finally:
        manager.close()
    return {f"{item}{jax.tree_util.keystr(path)}": np.asarray(leaf)
            for item in target for path, leaf in jax.tree_util.tree_leaves_with_path(restored[item])}


def assert_same_bits(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    different = [k for k in expected if actual[k].dtype != expected[k].dtype
                 or actual[k].tobytes() != expected[k].tobytes()]
    assert not different, f"{len(different)} of {len(expected)} arrays differ, e.g. {different[:3]}"
