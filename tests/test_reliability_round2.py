"""Reliability, second round: the workdir lock, config changes on resume, all checkpoints damaged,
override errors, a signal before the loop, metrics after a resume, and the CLI's error and eval paths.

Each test runs the public CLI (`python -m ddpm_jax.main`) on the tiny config in
subprocesses sharing the persistent XLA cache of tests/_runs.py, on a copy of one
short trained run, or calls the function it is about; docs/reliability.md lists
each promise with its test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax.numpy as jnp
import pytest
from _runs import REPO, TINY, Run, largest_data_file, logged_steps, run, saved_steps, subprocess_env

from ddpm_jax import checkpoints, config_validation, resume, train

STEPS = 4  # the trained run: checkpoints 2 and 4, one metrics row per step
FIELDS = {"training.num_train_steps": STEPS, "training.save_every": 2, "training.log_every": 1}


@pytest.fixture(scope="module")
def env():
    return subprocess_env()


def _cli(workdir: Path, *flags: str, **fields) -> list[str]:
    fields = {**FIELDS, **fields}
    return [sys.executable, "-m", "ddpm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in fields.items()), *flags]


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("trained") / "run"
    code, out = run(_cli(workdir), env, workdir.parent / "train.log")
    assert code == 0, out[-3000:]
    assert saved_steps(workdir) == [2, 4] and logged_steps(workdir) == [1, 2, 3, 4]
    return workdir


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    """A private copy of the trained run."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------
# Item 3: one trainer per workdir.


@pytest.mark.slow  # 40-90 s on the loaded 2-core VM
def test_a_second_trainer_is_refused_naming_the_holder_and_a_killed_one_does_not_block(env, tmp_path):
    workdir = tmp_path / "run"
    first = Run(_cli(workdir, **{"training.num_train_steps": 100_000, "training.save_every": 100_000}), env,
                tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 300
        while not logged_steps(workdir):
            assert first.proc.poll() is None, first.output()[-3000:]
            assert time.monotonic() < deadline, "the first trainer logged no step"
            time.sleep(0.05)
        start = time.monotonic()
        code, out = run(_cli(workdir, **{"training.num_train_steps": 2}), env, tmp_path / "second.log")
        seconds = time.monotonic() - start
        assert code != 0, out[-3000:]
        holder = json.loads((workdir / resume.LOCK_FILE).read_text())
        assert holder["pid"] == first.proc.pid and {"host", "started"} <= holder.keys()
        assert "is in use by another training run" in out and f'"pid": {first.proc.pid}' in out
        assert "Traceback" not in out
        assert seconds < 60  # refused before any data or compilation (about 4 s of imports here)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
    finally:
        first.close()
    # The killed trainer's lock died with it; its lock file (naming it) is still there and does not block.
    code, out = run(_cli(workdir, **{"training.num_train_steps": 1}), env, tmp_path / "third.log")
    assert code == 0, out[-3000:]
    assert json.loads((workdir / resume.LOCK_FILE).read_text())["pid"] != first.proc.pid


# --------------------------------------------------------------------------
# Item 4: a changed experiment is not resumed silently.


@pytest.mark.slow  # 40-90 s on the loaded 2-core VM
def test_a_changed_experiment_field_is_refused_on_resume_unless_allowed(env, copy, tmp_path):
    code, out = run(_cli(copy, **{"training.lr": 0.002, "diffusion.num_timesteps": 50,
                                  "training.num_train_steps": 6}), env, tmp_path / "changed.log")
    assert code != 0
    assert "training.lr: 0.001 -> 0.002" in out and "diffusion.num_timesteps: 100 -> 50" in out, out[-3000:]
    assert "--allow_config_change" in out and "Traceback" not in out
    assert saved_steps(copy) == [2, 4]  # nothing trained, nothing moved

    # Fields of how the run is carried out may change: training.num_train_steps, log_every, sampling.*, eval.*
    code, out = run(_cli(copy, **{"training.num_train_steps": 5, "training.log_every": 2, "sampling.batch": 4,
                                  "eval.num_batches": 2}), env, tmp_path / "allowed_fields.log")
    assert code == 0, out[-3000:]
    code, out = run(_cli(copy, "--allow_config_change", **{"training.lr": 0.002, "training.num_train_steps": 6}),
                    env, tmp_path / "allowed.log")
    assert code == 0, out[-3000:]
    assert "Resuming with a changed config (allowed): training.lr: 0.001 -> 0.002" in out
    assert json.loads((copy / "config.json").read_text())["config"]["training"]["lr"] == 0.002


def test_fields_added_since_a_checkpoint_was_written_are_not_changes():
    config = _tiny()
    old = json.loads(config.to_json_best_effort())
    for group, fields in checkpoints.ADDED_FIELDS.items():
        for name in fields:
            del old[group][name]  # a checkpoint written before these fields existed
    assert resume.config_changes(old, config) == []
    old["model"]["ch_mult"] = [1, 2, 2]  # JSON lists against tuples: only real changes count
    old["diffusion"]["schedule_kwargs"] = {"beta_end": 0.01}
    assert resume.config_changes(old, config) == ["diffusion.schedule_kwargs.beta_end: 0.01 -> '<absent>'",
                                                  "model.ch_mult: [1, 2, 2] -> [1, 2]"]


# --------------------------------------------------------------------------
# Item 5: every checkpoint damaged.


@pytest.mark.slow  # 40-90 s on the loaded 2-core VM
def test_every_checkpoint_damaged_is_an_error_unless_a_fresh_start_is_asked_for(env, copy, tmp_path):
    for step in (2, 4):
        path = largest_data_file(copy / checkpoints.CHECKPOINT_DIR / str(step))
        os.truncate(path, path.stat().st_size // 2)
    code, out = run(_cli(copy), env, tmp_path / "damaged.log")
    assert code != 0
    assert "every checkpoint in" in out and "steps [4, 2]" in out and "--fresh_start_if_damaged" in out, out[-3000:]
    assert "Traceback" not in out
    assert saved_steps(copy) == [2, 4] and not (copy / checkpoints.DAMAGED_DIR).exists()  # left in place

    code, out = run(_cli(copy, "--fresh_start_if_damaged"), env, tmp_path / "fresh.log")
    assert code == 0, out[-3000:]
    assert sorted(os.listdir(copy / checkpoints.DAMAGED_DIR)) == ["2", "4"]
    assert saved_steps(copy) == [2, 4]  # retrained from step 0
    assert logged_steps(copy) == [1, 2, 3, 4]  # the old rows of the recomputed steps are gone



def test_only_the_leftovers_of_a_failed_restore_are_kept_from_sys_unraisablehook(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoints._quiet_failed_restore_leftovers()
    checkpoints._quiet_failed_restore_leftovers()  # installed once: the previous hook is not wrapped twice
    hook = sys.unraisablehook

    def raised_in(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            return err

    def call_soon_threadsafe():  # the frame name of asyncio's method on a closed loop
        raise RuntimeError("Event loop is closed")

    closed = raised_in(call_soon_threadsafe)
    orbax_coroutine = types.SimpleNamespace(cr_code=types.SimpleNamespace(
        co_filename=os.path.join("site-packages", "orbax", "checkpoint", "_src", "serialization.py")))
    args = lambda value, obj=None, tb=None: types.SimpleNamespace(
        exc_type=type(value), exc_value=value, exc_traceback=tb or value.__traceback__, err_msg=None, object=obj)
    hook(args(closed))
    hook(args(ValueError("read error"), obj=orbax_coroutine))
    assert seen == []
    other = [args(RuntimeError("Event loop is closed"), tb=raised_in(lambda: 1 / 0).__traceback__),
             args(RuntimeError("something else"), tb=closed.__traceback__),
             args(ValueError("mine"), obj=types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename="mine.py")))]
    for a in other:
        hook(a)
    assert seen == other

# --------------------------------------------------------------------------
# Item 6: override errors and schedule keywords.


def _parse(env, *flags: str) -> subprocess.CompletedProcess:
    """main.parse_flags on the tiny config with `flags`; prints the resulting config as JSON."""
    code = ("import sys; from ddpm_jax import main, config_validation; main.parse_flags(sys.argv);"
            "config_validation.validate_config(main._CONFIG.value); print(main._CONFIG.value.to_json())")
    return subprocess.run([sys.executable, "-c", code, f"--config={TINY}", "--workdir=unused", *flags], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_an_unknown_override_is_one_error_with_the_nearest_names(env, tmp_path):
    result = subprocess.run(_cli(tmp_path, "--config.training.lr_warmup=5", "--config.modle.ch=4"), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--config.training.lr_warmup: not a config field; did you mean training.warmup_steps" in result.stderr
    assert "--config.modle.ch: not a config field; did you mean model.ch" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 5, result.stderr
    assert not tmp_path.joinpath("checkpoints").exists()


@pytest.mark.parametrize("schedule, flags, expected", [
    ("linear", ["--config.diffusion.schedule_kwargs.beta_end=0.5"], {"beta_end": 0.5}),
    ("cosine", ["--config.diffusion.schedule_kwargs.s=0.01", "--config.diffusion.schedule_kwargs.max_beta", "0.5"],
     {"s": 0.01, "max_beta": 0.5}),
    ("quadratic", ["--config.diffusion.schedule_kwargs.beta_start=2e-4"], {"beta_start": 2e-4}),
    ("custom", [f"--config.diffusion.schedule_kwargs.betas={[0.01] * 100}"], {"betas": [0.01] * 100}),
])
def test_schedule_keywords_are_overridable_one_at_a_time(env, schedule, flags, expected):
    result = _parse(env, f"--config.diffusion.schedule={schedule}", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["diffusion"]["schedule_kwargs"] == expected


def test_a_bad_schedule_keyword_is_named_by_its_path(env):
    result = _parse(env, "--config.diffusion.schedule_kwargs.beta_end=1.5")
    assert result.returncode != 0
    assert "diffusion.schedule_kwargs.beta_end" in result.stderr.splitlines()[-1], result.stderr[-2000:]


# --------------------------------------------------------------------------
# Item 7.


@pytest.mark.slow  # ~10 s; test_train.py's SIGTERM test and test_main.py's CLI one stay in the default suite
def test_sigterm_before_the_training_loop_exits_cleanly_and_loses_nothing(env, copy, tmp_path):
    (copy / "config.json").unlink()  # written again just before the loop: the moment to signal
    before = {step: sorted(p.name for p in (copy / checkpoints.CHECKPOINT_DIR / str(step)).rglob("*"))
              for step in saved_steps(copy)}
    process = Run(_cli(copy, **{"training.num_train_steps": 8}), env, tmp_path / "sigterm.log")
    try:
        deadline = time.monotonic() + 300
        while not (copy / "config.json").exists():
            assert process.proc.poll() is None, process.output()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        process.proc.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        process.close()
    assert code == 0, process.output()[-3000:]
    assert {step: sorted(p.name for p in (copy / checkpoints.CHECKPOINT_DIR / str(step)).rglob("*"))
            for step in saved_steps(copy)} == before
    assert logged_steps(copy) == [1, 2, 3, 4]


@pytest.mark.slow  # 40-90 s on the loaded 2-core VM
def test_metrics_rows_of_recomputed_steps_are_dropped_on_resume(env, copy, tmp_path):
    shutil.rmtree(copy / checkpoints.CHECKPOINT_DIR / "4")  # as if killed after logging step 4, before its save
    code, out = run(_cli(copy), env, tmp_path / "resumed.log")
    assert code == 0, out[-3000:]
    assert logged_steps(copy) == [1, 2, 3, 4]  # 3 and 4 once, from the resumed run


class _NoCheckpoint:
    @staticmethod
    def latest_step():
        return None


def test_the_nonfinite_error_says_when_there_is_no_checkpoint():
    with pytest.raises(FloatingPointError, match="no checkpoint has been saved yet") as info:
        train._check_finite({"consecutive_nonfinite": jnp.asarray(3)}, 3, 3, _NoCheckpoint())
    assert "None" not in str(info.value)


def test_the_sampling_batch_is_checked_against_the_local_devices(env, copy):
    config = _tiny()
    config.sampling.batch, config.training.sample_every = 3, 10
    with pytest.raises(ValueError, match=r"^sampling.batch must be a multiple of the local device count 2"):
        config_validation.validate_config(config, process_count=1, local_device_count=2)
    result = subprocess.run(_cli(copy, "--mode=sample", **{"sampling.batch": 3}), cwd=REPO,
                            env=subprocess_env(num_devices=2), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "sampling.batch must be a multiple of the local device count 2" in result.stderr, result.stderr[-3000:]
    assert "shape[0]" not in result.stderr


def test_eval_prints_the_bound_before_writing_and_a_write_failure_is_a_warning(env, copy):
    (copy / "eval").write_text("not a directory")  # eval/nll_*.json cannot be written (as in a read-only workdir)
    result = subprocess.run(_cli(copy, "--mode=eval"), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.splitlines()[-1])
    assert printed["step"] == STEPS and printed["bpd"] > 0
    assert "could not be written" in result.stderr


def _tiny():
    import importlib.util  # pylint: disable=import-outside-toplevel

    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
