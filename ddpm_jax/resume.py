"""Guards on starting training in a workdir: one trainer at a time, and no silent change of experiment.

`workdir_lock(workdir)` holds an exclusive lock on workdir/train.lock for the
whole run (process 0 of a multi-process run holds it for all); a second trainer
refuses at once, naming the holder. `check_config_change(workdir, config)`
compares the config of the run being resumed (workdir/config.json) with the new
one and refuses when a field outside MAY_CHANGE_ON_RESUME differs.
Both raise ResumeRefused, whose message says what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import checkpoints

LOCK_FILE = "train.lock"

# Fields that change how a run is carried out, logged or evaluated, not the
# experiment: a resume may change them freely. A group name covers all its fields.
# ordered_allreduce changes only the summation order of the gradient mean (as a
# new device count does), and data_dir only where the same data set is read from.
MAY_CHANGE_ON_RESUME = (
    "training.num_train_steps", "training.log_every", "training.save_every", "training.keep_checkpoints",
    "training.sample_every", "training.async_checkpointing", "training.max_consecutive_nonfinite",
    "training.ordered_allreduce", "data.worker_count", "data.data_dir", "sampling", "eval",
)


class ResumeRefused(RuntimeError):
    """Training will not start in this workdir; the message names the cause and the way out."""


# --------------------------------------------------------------------------
# The lock.


def _acquire(workdir: str) -> tuple[int | None, str | None]:
    """(fd holding an exclusive flock on workdir/LOCK_FILE, None), or (None, why not)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "holder not yet recorded"
        os.close(fd)
        return None, (f"{os.path.abspath(workdir)} is in use by another training run ({path}: {holder}). "
                      "Stop that run first, or train in another --workdir.")
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd, None


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Process 0 holds an exclusive lock on workdir/train.lock until the block ends; raises ResumeRefused
    on every process when another run holds it.

    The lock is a flock(2) on the open file, not the file's existence: the kernel
    drops it when the holder exits in any way (SIGKILL included), so a lock file
    left behind never blocks the next run; the JSON in it (host, pid, start time)
    only names a live holder. The file is never deleted (deleting it would let two
    runs lock two different files).
    """
    fd, error = _acquire(workdir) if jax.process_index() == 0 else (None, None)
    if jax.process_count() > 1:  # every process learns whether process 0 got the lock
        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        error = error or (None if locked else f"process 0 could not lock {workdir} (its error names the holder)")
    if error:
        raise ResumeRefused(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


# --------------------------------------------------------------------------
# The config of a resumed run.


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of a nested dict (the JSON form of a config)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_leaves(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def _may_change(path: str) -> bool:
    return any(path == name or path.startswith(name + ".") for name in MAY_CHANGE_ON_RESUME)


def config_changes(previous: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'path: old -> new' for each experiment field (not in MAY_CHANGE_ON_RESUME) that differs.

    previous: the JSON form of the resumed run's config; fields added to the
    schema since it was written count with the value older runs had (checkpoints.ADDED_FIELDS).
    """
    as_json = lambda c: json.loads(c.to_json_best_effort())  # lists and tuples compare alike
    old = _leaves(as_json(checkpoints.config_from_json(previous)))
    new = _leaves(as_json(config))
    absent = "<absent>"
    return [f"{path}: {old.get(path, absent)!r} -> {new.get(path, absent)!r}"
            for path in sorted(old.keys() | new.keys())
            if not _may_change(path) and old.get(path, absent) != new.get(path, absent)]


def check_config_change(workdir: str, config: ml_collections.ConfigDict, *, allow: bool) -> list[str]:
    """Raises ResumeRefused naming every changed experiment field, unless `allow`; returns the changes.

    Compares with workdir/config.json, the config of the run that wrote the
    checkpoints (rewritten at every start); call it only when there is a checkpoint to resume.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        changes = config_changes(json.load(f)["config"], config)
    if changes and not allow:
        raise ResumeRefused(
            f"the config differs from the one that trained the checkpoints in {os.path.abspath(workdir)} ({path}) "
            f"in {len(changes)} field(s) that change the experiment:\n  " + "\n  ".join(changes) +
            "\nResume with the old values, train in a new --workdir, or pass --allow_config_change "
            "(train_and_evaluate(..., allow_config_change=True)) to continue with the new ones. Fields that may "
            f"change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}.")
    return changes
