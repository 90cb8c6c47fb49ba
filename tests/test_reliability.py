"""Reliability of a training run, end to end: signals, damaged checkpoints, non-finite losses.

The oracle is an uninterrupted run of the same config (`reference`): every
interrupted, killed, damaged or poisoned run must end with the SAME bits (on
CPU, XLA is deterministic for a fixed program), or keep exactly the checkpoint
the reference has at that step. Training runs are subprocesses of the public
CLI (`python -m ddpm_jax.main`), or of tests/_train_worker.py where a test
needs a hook the CLI does not have (NaN batches). They share one persistent
XLA compilation cache, so only the first run compiles.

The figures quoted in docs/reliability.md are collected in FIGURES and written
to $DDPM_RELIABILITY_SUMMARY (JSON) when that variable is set.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _runs import (TINY, WORKER, Run, assert_same_bits, largest_data_file, load_checkpoint, logged_steps,
                   metrics, run, saved_steps, subprocess_env, tmp_dirs, wait_for_step)

from ddpm_jax import checkpoints

NUM_STEPS = 60  # long enough that a signal sent at step <= 20 lands mid-run
SAVE_EVERY = 5
# Every run shares these, so every run compiles the same program as the reference.
RUN_FIELDS = {"training.log_every": 1, "training.save_every": SAVE_EVERY}
SEED = 20240601  # draws the signal steps
FIGURES: dict = {}


@pytest.fixture(scope="module")
def env():
    yield subprocess_env()
    if os.environ.get("DDPM_RELIABILITY_SUMMARY"):
        with open(os.environ["DDPM_RELIABILITY_SUMMARY"], "w", encoding="utf-8") as f:
            json.dump(FIGURES, f, indent=2, sort_keys=True)
    print("\nreliability figures:", json.dumps(FIGURES, sort_keys=True))


def _cli(workdir: Path, **fields) -> list[str]:
    fields = {**RUN_FIELDS, "training.num_train_steps": NUM_STEPS, **fields}
    return [sys.executable, "-m", "ddpm_jax.main", f"--config={TINY}", f"--workdir={workdir}", "--mode=train",
            *(f"--config.{k}={v}" for k, v in fields.items())]


def _worker(workdir: Path, *extra: str, **fields) -> list[str]:
    fields = {**RUN_FIELDS, "training.num_train_steps": NUM_STEPS, **fields}
    return [sys.executable, str(WORKER), f"--config={TINY}", f"--workdir={workdir}",
            *(f"--set={k}={v!r}" for k, v in fields.items()), *extra]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """One uninterrupted run of NUM_STEPS steps, keeping every checkpoint: (workdir, final arrays)."""
    workdir = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    code, out = run(_cli(workdir, **{"training.keep_checkpoints": 100}), env, workdir.parent / "reference.log")
    assert code == 0, out[-3000:]
    FIGURES["reference_run_seconds"] = round(time.monotonic() - start, 1)
    assert saved_steps(workdir) == list(range(SAVE_EVERY, NUM_STEPS + 1, SAVE_EVERY))
    return workdir, load_checkpoint(workdir, NUM_STEPS)


# --------------------------------------------------------------------------
# Signals.


@pytest.mark.slow
@pytest.mark.parametrize("when", ["inside an interval", "just after a periodic save"])
def test_sigterm_saves_the_current_step_and_resume_is_bit_identical(env, reference, tmp_path, when):
    _, ref_final = reference
    rng = np.random.default_rng([SEED, len(when)])
    if when == "inside an interval":
        signal_step = int(rng.choice([s for s in range(3, 20) if s % SAVE_EVERY]))
        delay = rng.uniform(0.0, 0.03)  # anywhere inside a step
    else:  # the loop sees the signal at the boundary of a step it has just checkpointed
        signal_step, delay = int(rng.choice([10, 15])), 0.0
    workdir = tmp_path / "run"
    process = Run(_cli(workdir), env, tmp_path / "first.log")
    try:
        wait_for_step(process, workdir, signal_step)
        time.sleep(delay)
        process.proc.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        process.close()
    out = process.output()
    assert code == 0, out[-3000:]
    stopped = logged_steps(workdir)[-1]
    assert signal_step <= stopped < NUM_STEPS, "the signal must land mid-run"
    # 0 steps lost: the newest checkpoint is the last completed step.
    assert max(saved_steps(workdir)) == stopped
    assert int(load_checkpoint(workdir, stopped)["state['step']"]) == stopped
    assert f"saving step {stopped}" in out

    rows_before = len(logged_steps(workdir))
    code, out = run(_cli(workdir), env, tmp_path / "resumed.log")
    assert code == 0, out[-3000:]
    assert logged_steps(workdir)[rows_before] == stopped + 1  # resumed right after the saved step
    assert_same_bits(load_checkpoint(workdir, NUM_STEPS), ref_final)
    FIGURES[f"sigterm {when}"] = {"signal_step": signal_step, "stopped_at": stopped, "steps_lost": 0,
                                  "stopped_on_a_saved_step": stopped % SAVE_EVERY == 0,
                                  "final_params": "bit-identical"}


@pytest.mark.slow
@pytest.mark.parametrize("async_checkpointing", [False, True], ids=["sync_saves", "async_saves"])
def test_sigkill_resumes_from_the_last_finished_save_and_is_bit_identical(env, reference, tmp_path,
                                                                          async_checkpointing):
    _, ref_final = reference
    rng = np.random.default_rng(SEED + 1)
    kill_step = int(rng.integers(SAVE_EVERY + 1, 25))
    workdir = tmp_path / "run"
    # keep_checkpoints=1: the old checkpoint may be deleted only once the new one is complete.
    fields = {"training.keep_checkpoints": 1, "training.async_checkpointing": async_checkpointing}
    process = Run(_cli(workdir, **fields), env, tmp_path / "first.log")
    try:
        wait_for_step(process, workdir, kill_step)
        time.sleep(rng.uniform(0.0, 0.03))
        process.proc.kill()
        code = process.wait(timeout=60)
    finally:
        process.close()
    assert code == -signal.SIGKILL
    logged = logged_steps(workdir)[-1]
    saved = saved_steps(workdir)
    in_flight = tmp_dirs(workdir)
    assert saved, "a SIGKILL must never leave the run without a finished checkpoint"
    newest = max(saved)
    if async_checkpointing:
        # A save waits for the previous one to finish before it starts, and the step is logged before
        # its save: so at the kill at most one save is being written and one more is waiting for it.
        last_started = logged - logged % SAVE_EVERY
        assert last_started - 2 * SAVE_EVERY <= newest <= logged
    else:
        # Each save is committed before the next step: at most one interval is recomputed.
        assert logged - SAVE_EVERY <= newest <= logged
    assert all(int(name.split(".")[0]) > newest for name in in_flight)

    code, out = run(_cli(workdir, **fields), env, tmp_path / "resumed.log")
    assert code == 0, out[-3000:]
    assert f"Resumed from step {newest} of" in out
    # The rows of the recomputed steps newest+1..logged were dropped on resume (docs/reliability.md): one row per step.
    assert logged_steps(workdir) == list(range(1, NUM_STEPS + 1))
    assert_same_bits(load_checkpoint(workdir, NUM_STEPS), ref_final)
    FIGURES[f"sigkill {'async' if async_checkpointing else 'sync'} saves"] = {
        "kill_step": kill_step, "last_logged_step": logged, "resumed_from": newest,
        "steps_recomputed": logged - newest, "save_in_flight_at_kill": in_flight, "final_params": "bit-identical"}


# --------------------------------------------------------------------------
# Damaged checkpoints, end to end.


@pytest.mark.slow
def test_resume_skips_damaged_and_partial_checkpoints_and_is_bit_identical(env, reference, tmp_path):
    ref_dir, ref_final = reference
    workdir = tmp_path / "run"
    ckpt = workdir / checkpoints.CHECKPOINT_DIR
    for step in range(SAVE_EVERY, 31, SAVE_EVERY):
        shutil.copytree(ref_dir / checkpoints.CHECKPOINT_DIR / str(step), ckpt / str(step))
    truncated = largest_data_file(ckpt / "30")
    os.truncate(truncated, truncated.stat().st_size // 2)  # step 30: a truncated array file
    largest_data_file(ckpt / "25", "ema_params").unlink()  # step 25: a deleted array file
    # Step 35: a crash mid-write leaves Orbax's temporary directory, half filled.
    partial = ckpt / "35.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(ref_dir / checkpoints.CHECKPOINT_DIR / "35" / "state", partial / "state")
    largest_data_file(partial).unlink()

    code, out = run(_cli(workdir), env, tmp_path / "resumed.log")
    assert code == 0, out[-3000:]
    for step in (30, 25):
        assert f"Checkpoint step {step} in {ckpt} is damaged and cannot be restored" in out
    assert "falling back to the next older checkpoint" in out
    assert "Checkpoint step 35" not in out  # a temporary directory is not a checkpoint: no restore attempt
    assert logged_steps(workdir)[0] == 21  # resumed from step 20
    # Moved aside, never deleted: the operator can still inspect them.
    assert sorted(os.listdir(workdir / checkpoints.DAMAGED_DIR)) == ["25", "30"]
    assert_same_bits(load_checkpoint(workdir, NUM_STEPS), ref_final)
    FIGURES["damaged_end_to_end"] = {"faults": ["truncated array file (step 30)", "deleted EMA array file (step 25)",
                                                "partial tmp directory (step 35)"],
                                     "resumed_from": 20, "final_params": "bit-identical"}


# --------------------------------------------------------------------------
# Non-finite values (tests/_train_worker.py --nan_steps poisons whole batches).


@pytest.mark.slow
def test_a_nonfinite_batch_is_skipped_counted_and_logged(env, tmp_path):
    workdir = tmp_path / "run"
    # Batch index 3 is step 4 (steps count from 1); save every step to see the skip.
    code, out = run(_worker(workdir, "--nan_steps=3", **{"training.num_train_steps": 8, "training.save_every": 1,
                                                          "training.keep_checkpoints": 100}),
                     env, tmp_path / "run.log")
    assert code == 0, out[-3000:]
    rows = {row["step"]: row for row in metrics(workdir)}
    assert [rows[s]["skipped"] for s in range(1, 9)] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert [rows[s]["nonfinite_count"] for s in range(1, 9)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert not np.isfinite(rows[4]["loss"]) and all(np.isfinite(rows[s]["loss"]) for s in (3, 5))
    before, skipped, after = (load_checkpoint(workdir, s) for s in (3, 4, 5))
    # The skipped step kept params, Adam state and EMA exactly; only the counters moved.
    counters = ("state['step']", "state['nonfinite_count']", "state['consecutive_nonfinite']")
    assert_same_bits({k: v for k, v in skipped.items() if k not in counters},
                      {k: v for k, v in before.items() if k not in counters})
    assert [int(skipped[k]) for k in counters] == [4, 1, 1]
    assert [int(after[k]) for k in counters] == [5, 1, 0]
    assert not np.array_equal(after["state['params']['conv_in']['kernel']"],
                              skipped["state['params']['conv_in']['kernel']"])
    FIGURES["nan_skip"] = {"poisoned_steps": [4], "skipped": 1, "nonfinite_count": 1, "run_completed": True}


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(env, reference, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    limit = 3  # tiny.py's training.max_consecutive_nonfinite
    poisoned = range(6, NUM_STEPS)  # batch index 6 onwards = steps 7, 8, 9, ...
    code, out = run(_worker(workdir, f"--nan_steps={','.join(map(str, poisoned))}",
                             **{"training.max_consecutive_nonfinite": limit}), env, tmp_path / "run.log")
    assert code == 3, out[-3000:]  # the worker's exit code for FloatingPointError
    assert f"not finite for {limit} consecutive steps" in out
    assert f"training.max_consecutive_nonfinite = {limit}" in out
    failed_at = 6 + limit
    assert f"training stopped at step {failed_at}" in out
    rows = {row["step"]: row for row in metrics(workdir)}
    assert [rows[s]["consecutive_nonfinite"] for s in (6, 7, 8)] == [0, 1, 2]
    assert failed_at - 1 <= max(rows) <= failed_at  # the failing step itself is reported in the error
    # The last good checkpoint (step 5) is kept and equals the uninterrupted run's step 5.
    assert saved_steps(workdir) == [5]
    assert_same_bits(load_checkpoint(workdir, 5), load_checkpoint(ref_dir, 5))
    FIGURES["nan_stop"] = {"limit": limit, "first_poisoned_step": 7, "stopped_at": failed_at,
                           "last_good_checkpoint": 5, "checkpoint": "bit-identical to the reference"}


# --------------------------------------------------------------------------
# Damaged checkpoints, the checkpoints module alone (no training: seconds).


def _small_state(seed: int) -> tuple[dict, dict]:
    """A stand-in TrainState item and EMA item: float32 arrays of a few KB, distinct per seed."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(32, 32)).astype(np.float32), "b": rng.normal(size=(32,)).astype(np.float32)}
    state = {"step": np.int32(seed), "params": params}
    ema = jax.tree.map(lambda x: 0.5 * x, params)
    return jax.tree.map(jax.numpy.asarray, state), jax.tree.map(jax.numpy.asarray, ema)


def _abstract(tree):
    """The restore target, with a sharding as training passes one."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture
def three_checkpoints(tmp_path):
    """workdir with finished checkpoints 1, 2, 3 of _small_state(step); returns (workdir, {step: (state, ema)})."""
    manager = checkpoints.make_manager(str(tmp_path), max_to_keep=10)
    saved = {}
    for step in (1, 2, 3):
        saved[step] = _small_state(step)
        checkpoints.save(manager, step, *saved[step], {"note": "test"})
    manager.wait_until_finished()
    manager.close()
    return tmp_path, saved


def _restore(workdir: Path, like: tuple[dict, dict], max_to_keep: int = 10):
    manager = checkpoints.make_manager(str(workdir), max_to_keep=max_to_keep)
    try:
        return checkpoints.restore_latest(manager, _abstract(like[0]), _abstract(like[1]))
    finally:
        manager.close()


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated array file": lambda d: _truncate_half(largest_data_file(d)),
    "deleted array file": lambda d: largest_data_file(d).unlink(),
    "zeroed array file": lambda d: largest_data_file(d).write_bytes(bytes(largest_data_file(d).stat().st_size)),
    "truncated OCDBT manifest": lambda d: _truncate_half(d / "state" / "manifest.ocdbt"),
    "deleted EMA item": lambda d: shutil.rmtree(d / "ema_params"),
    "empty meta JSON": lambda d: (d / "meta" / "metadata").write_text(""),
    # Orbax stores no checksum: these restore without error and only the CRC-32 in meta catches them.
    "flipped byte in a state array": lambda d: _flip_middle_byte(largest_data_file(d)),
    "flipped byte in an EMA array": lambda d: _flip_middle_byte(largest_data_file(d, "ema_params")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_restore_falls_back_past_a_damaged_newest_checkpoint(three_checkpoints, damage, caplog):
    workdir, saved = three_checkpoints
    DAMAGES[damage](workdir / checkpoints.CHECKPOINT_DIR / "3")
    with caplog.at_level("WARNING"):
        restored = _restore(workdir, saved[1])
    assert restored is not None and restored.step == 2
    assert_same_bits(_flat((restored.state, restored.ema_params)), _flat(saved[2]))
    assert "Checkpoint step 3 in" in caplog.text and "is damaged and cannot be restored" in caplog.text
    assert "falling back to the next older checkpoint" in caplog.text
    assert os.listdir(workdir / checkpoints.DAMAGED_DIR) == ["3"]  # moved aside, not deleted
    assert saved_steps(workdir) == [1, 2]
    FIGURES.setdefault("faults_detected", []).append(damage)


@pytest.mark.parametrize("name", ["state/_METADATA", "ema_params/_METADATA", "commit_success.txt"])
def test_a_deleted_metadata_file_is_not_damage(three_checkpoints, name, caplog):
    """The restore target gives the tree and shardings, so these files are not needed: step 3 restores exactly."""
    workdir, saved = three_checkpoints
    (workdir / checkpoints.CHECKPOINT_DIR / "3" / name).unlink()
    with caplog.at_level("WARNING"):
        restored = _restore(workdir, saved[1])
    assert restored.step == 3 and "damaged" not in caplog.text
    assert_same_bits(_flat((restored.state, restored.ema_params)), _flat(saved[3]))


def test_a_partial_temporary_directory_is_not_a_checkpoint(three_checkpoints, caplog):
    workdir, saved = three_checkpoints
    directory = workdir / checkpoints.CHECKPOINT_DIR
    partial = directory / "4.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(directory / "3", partial)
    (partial / "commit_success.txt").unlink()
    largest_data_file(partial).unlink()
    with caplog.at_level("WARNING"):
        restored = _restore(workdir, saved[1])
    assert restored.step == 3
    assert_same_bits(_flat((restored.state, restored.ema_params)), _flat(saved[3]))
    assert "damaged" not in caplog.text
    FIGURES.setdefault("faults_detected", []).append("partial temporary directory")


_CRASH_CHILD = r"""
import sys
import jax.numpy as jnp
from ddpm_jax import checkpoints

manager = checkpoints.make_manager(sys.argv[1], max_to_keep=1)
for step in (1, 2):  # 32 MB per item, so the write of step 2 takes long enough to be killed in
    state = {"step": jnp.int32(step), "params": {"w": jnp.full((2**23,), float(step))}}
    checkpoints.save(manager, step, state, state["params"], {})
    if step == 1:
        manager.wait_until_finished()
        print("step 1 saved", flush=True)
manager.wait_until_finished()
print("step 2 saved", flush=True)
"""


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path):
    """keep_checkpoints=1 and SIGKILL while step 2 is being written: step 1 must survive intact."""
    out = tmp_path / "child.log"
    child = Run([sys.executable, "-c", _CRASH_CHILD, str(tmp_path)], subprocess_env(), out)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / checkpoints.CHECKPOINT_DIR).glob("2.orbax-checkpoint-tmp*")):
            assert child.proc.poll() is None, child.output()
            assert time.monotonic() < deadline, "step 2 never started"
            time.sleep(0.001)
        child.proc.kill()
        child.wait(timeout=30)
    finally:
        child.close()
    assert "step 2 saved" not in out.read_text()
    assert saved_steps(tmp_path) == [1]
    like = {"step": np.int32(0), "params": {"w": np.zeros((2**23,), np.float32)}}
    restored = _restore(tmp_path, (like, like["params"]), max_to_keep=1)
    assert restored.step == 1 and np.all(np.asarray(restored.ema_params["w"]) == 1.0)
    # The next save of step 2 does not collide with the leftover temporary directory,
    # and only then is step 1 deleted (keep 1).
    manager = checkpoints.make_manager(str(tmp_path), max_to_keep=1)
    state = {"step": jax.numpy.int32(2), "params": {"w": jax.numpy.full((2**23,), 2.0)}}
    checkpoints.save(manager, 2, state, state["params"], {})
    manager.wait_until_finished()
    manager.close()
    assert saved_steps(tmp_path) == [2]
    FIGURES["crash_mid_write"] = {"keep_checkpoints": 1, "previous_checkpoint": "intact and restored"}


def test_a_stale_temporary_directory_does_not_leak_a_checkpoint(three_checkpoints):
    workdir, _ = three_checkpoints
    directory = workdir / checkpoints.CHECKPOINT_DIR
    shutil.copytree(directory / "3", directory / "4.orbax-checkpoint-tmp-1700000000000000")
    manager = checkpoints.make_manager(str(workdir), max_to_keep=2)
    for step in (4, 5, 6):
        checkpoints.save(manager, step, *_small_state(step), {})
        manager.wait_until_finished()
    manager.close()
    assert saved_steps(workdir) == [5, 6]


def test_a_changed_model_shape_is_an_error_not_damage(three_checkpoints):
    workdir, saved = three_checkpoints
    wider = jax.tree.map(lambda x: np.zeros((2 * x.shape[0],) + x.shape[1:], x.dtype) if x.ndim else x, saved[1])
    try:
        result = _restore(workdir, wider)
    except ValueError:
        result = "raised"
    assert saved_steps(workdir) == [1, 2, 3], "good checkpoints were moved aside"
    assert result == "raised"


def test_the_checksum_sees_every_bit_and_not_the_container_type():
    state, ema = _small_state(1)
    assert checkpoints.checksum(state) == checkpoints.checksum(jax.tree.map(np.asarray, state))
    # Orbax metadata restores namedtuples as dicts: the same arrays must hash alike.
    Pair = collections.namedtuple("Pair", ["w", "b"])  # fields not in sorted order
    assert checkpoints.checksum(Pair(ema["w"], ema["b"])) == checkpoints.checksum({"b": ema["b"], "w": ema["w"]})
    flipped = np.asarray(ema["w"]).copy()
    flipped.view(np.uint32)[7, 3] ^= 1  # the lowest mantissa bit of one weight
    assert checkpoints.checksum(dict(ema, w=flipped)) != checkpoints.checksum(ema)
    assert checkpoints.checksum({"a": ema["w"]}) != checkpoints.checksum({"b": ema["w"]})  # paths count


def test_the_sampler_path_skips_a_checkpoint_that_fails_its_checksum(three_checkpoints, caplog):
    workdir, saved = three_checkpoints
    _flip_middle_byte(largest_data_file(workdir / checkpoints.CHECKPOINT_DIR / "3", "ema_params"))
    with caplog.at_level("WARNING"):
        params, meta, step = checkpoints.load_item(str(workdir), "ema_params")
    assert step == 2 and meta["checksums"]["ema_params"] == checkpoints.checksum(saved[2][1])
    assert_same_bits(_flat(params), _flat(saved[2][1]))
    assert "Checkpoint step 3" in caplog.text and "CRC-32" in caplog.text
    assert saved_steps(workdir) == [1, 2, 3]  # reading for sampling moves nothing
