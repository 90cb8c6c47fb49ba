"""Orbax checkpoints of a training run: periodic saves, keep-N, resume, damaged-checkpoint fallback.

Layout under `workdir`:
  checkpoints/<step>/state       params, Adam state, step, non-finite counters (StandardSave)
  checkpoints/<step>/ema_params  the EMA weights alone, so samplers read only what they use
  checkpoints/<step>/meta        JSON: step, the config, the code version (git commit) and a
                                 CRC-32 of each array item
  config.json                    the config and code version of the latest start
  damaged_checkpoints/<step>     a checkpoint that failed to restore, moved aside (not deleted)

Orbax writes every step into a temporary directory and renames it when the
save is complete, so a crash mid-save never replaces the last good
checkpoint; `wait_until_finished()` must run before the process exits.
Restores try the newest step first and fall back to older ones when a step
is damaged (a truncated or deleted file, or arrays whose CRC-32 differs from
the one saved in meta: Orbax itself stores no checksum, so a flipped byte would
otherwise restore silently): the bad step is named in a warning and moved
aside, so the next save of that step number does not collide.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
ITEMS = ("state", "ema_params", "meta")


def code_version() -> str:
    """The git commit of this package's checkout ('+dirty' with uncommitted changes), else 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def run_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint records about how it was made."""
    return {"config": json.loads(config.to_json_best_effort()), "git_commit": code_version(),
            "jax_version": jax.__version__}


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """workdir/config.json: the config and code version of this start (process 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(run_metadata(config), f, indent=2)


# Config fields added after checkpoints were first written, with the value that older
# checkpoints were trained with: a config read back from one of them gets these.
ADDED_FIELDS = {"training": {"ordered_allreduce": False, "async_checkpointing": True}}


def config_from_json(tree: dict) -> ml_collections.ConfigDict:
    """A config dict read back from JSON: lists turned back into tuples (ch_mult, attn_resolutions),
    fields added since it was written filled in from ADDED_FIELDS."""

    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    config = tuples(tree)
    for group, fields in ADDED_FIELDS.items():
        if isinstance(config.get(group), dict):
            config[group] = {**fields, **config[group]}
    return ml_collections.ConfigDict(config)


def make_manager(workdir: str, *, max_to_keep: int | None = None, read_only: bool = False,
                 asynchronous: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager for workdir/checkpoints keeping the newest `max_to_keep` steps.

    asynchronous=True: `save` returns while the step is written in the background;
    False: `save` returns once the step is committed.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=asynchronous and not read_only,
                                           # a crashed save's <step>.orbax-checkpoint-tmp-* would otherwise
                                           # confuse keep-N into deleting it instead of checkpoint <step>
                                           cleanup_tmp_directories=not read_only)
    handlers = {"state": ocp.StandardCheckpointHandler(), "ema_params": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options,
                                 item_handlers=handlers)


def checksum(tree: Any) -> str:
    """CRC-32 (8 hex digits) of every array of a pytree with its path, in path order.

    Reads this process's copy of each jax.Array. Paths are compared as plain
    names, so a tree restored into dicts (Orbax metadata) hashes like the
    namedtuples that were saved.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    crc = 0
    for names, leaf in sorted(((_names(path), leaf) for path, leaf in leaves), key=lambda item: item[0]):
        host = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        crc = zlib.crc32("/".join(names).encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(host).reshape(-1).view(np.uint8), crc)
    return f"{crc:08x}"


def save(manager: ocp.CheckpointManager, step: int, state: Any, ema_params: Any, meta: dict[str, Any]) -> None:
    """Saves step `step` (in the background with an asynchronous manager); every process must call it.

    state, ema_params: pytrees of jax.Arrays (replicated over the mesh: Orbax writes one copy).
    Their checksums go into meta (this waits for the arrays and reads them to the host).
    """
    checksums = {"state": checksum(state), "ema_params": checksum(ema_params)}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        ema_params=ocp.args.StandardSave(ema_params),
        meta=ocp.args.JsonSave({"step": int(step), **meta, "checksums": checksums}),
    ), force=True)


def _verify(restored: Any, items: tuple[str, ...]) -> None:
    """Raises ValueError when a restored item's CRC-32 differs from the one in its meta (none saved: skipped)."""
    saved = dict(restored["meta"]).get("checksums", {})
    for item in items:
        if item in saved and checksum(restored[item]) != saved[item]:
            raise ValueError(f"the arrays of '{item}' do not match the CRC-32 saved with them "
                             f"({checksum(restored[item])} != {saved[item]}): the files were changed after the save")


class Restored(NamedTuple):
    step: int
    state: Any
    ema_params: Any
    meta: dict[str, Any]


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
    step_dir = os.path.join(str(manager.directory), str(step))
    damaged = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
    if jax.process_index() == 0 and os.path.isdir(step_dir):
        os.makedirs(damaged, exist_ok=True)
        target = os.path.join(damaged, str(step))
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(damaged, f"{step}.{suffix}"), suffix + 1
        shutil.move(step_dir, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"ddpm_jax_move_aside_{step}")
    manager.reload()


def _names(path) -> tuple[str, ...]:
    """A key path as plain names: Orbax metadata has dict keys where the state has namedtuple fields."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_names(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _first_mismatch(manager: ocp.CheckpointManager, step: int, targets: dict[str, Any]) -> str | None:
    """The first array whose saved shape/dtype differs from the target's, or None.

    None too when the metadata cannot be read: the restore itself, which has the
    full target, then decides whether the step is damaged.
    """
    try:
        metadata = manager.item_metadata(step)
        saved = {item: _shapes(metadata[item]) for item in targets}
    except Exception:  # pylint: disable=broad-except
        return None
    if not all(saved.values()):  # an item's _METADATA is missing: nothing to compare
        return None
    for item, target in targets.items():
        wanted = _shapes(target)
        for key in sorted(saved[item].keys() | wanted.keys()):
            if saved[item].get(key) != wanted.get(key):
                return (f"{item}/{'/'.join(key)} is {saved[item].get(key, 'absent')} in the checkpoint but "
                        f"{wanted.get(key, 'absent')} for this config")
    return None


class AllCheckpointsDamaged(RuntimeError):
    """Every checkpoint of a workdir failed to restore; they are left in place."""


def _is_left_over_from_a_failed_restore(unraisable) -> bool:
    """Whether an unraisable exception is one of the two kinds a failed orbax restore leaves behind (see below)."""
    value, tb, obj = unraisable.exc_value, unraisable.exc_traceback, unraisable.object
    if type(value) is RuntimeError and str(value) == "Event loop is closed":
        while tb is not None and tb.tb_frame.f_code.co_name != "call_soon_threadsafe":
            tb = tb.tb_next
        return tb is not None
    code = getattr(obj, "cr_code", None)  # a coroutine finalized with its exception never retrieved
    return code is not None and f"orbax{os.sep}checkpoint" in code.co_filename


def _quiet_failed_restore_leftovers() -> None:
    """Drop the tracebacks a failed restore leaves behind; every other error prints as before. Installed (once per
    process) before a restore, since they may come before the restore's exception reaches its caller.

    When one array of a damaged checkpoint fails to read, orbax's restore raises and closes its
    asyncio event loop while TensorStore still completes the other reads. Two kinds of leftovers
    then reach sys.unraisablehook, each with a full traceback (tens of them, pages of TensorStore
    specs, for the tiny model's two damaged checkpoints): completions calling
    loop.call_soon_threadsafe on the closed loop ("RuntimeError: Event loop is closed"), and
    orbax's read coroutines finalized with their read error never retrieved. The caller already
    reported the damage once, with its step and the first error; this hook logs one line the
    first time it drops something and passes every other unraisable exception to the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_ddpm_jax_quiet", False):
        return
    dropped = []

    def hook(unraisable):
        if not _is_left_over_from_a_failed_restore(unraisable):
            previous(unraisable)
        elif not dropped:
            dropped.append(True)
            logging.info("Not printing the read errors and closed-event-loop callbacks left over from a failed "
                         "checkpoint restore (each damaged step is reported in a warning).")

    hook._ddpm_jax_quiet = True
    sys.unraisablehook = hook


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, abstract_ema: Any, *,
                   move_damaged: bool = True, fresh_start_if_damaged: bool = False) -> Restored | None:
    """The newest checkpoint that restores completely, or None when there is none.

    abstract_*: jax.ShapeDtypeStruct trees (with the shardings to restore into).
    A step that fails to restore (truncated or missing files, unreadable metadata,
    arrays that fail their checksum) is reported with logging.warning naming the
    step and the next older step is tried; once one restores, the damaged ones are
    (with move_damaged) moved to workdir/damaged_checkpoints/. When every step is
    damaged, AllCheckpointsDamaged is raised naming them, and nothing is moved,
    unless fresh_start_if_damaged: then they are moved aside and None is returned.
    A readable checkpoint of other shapes (the config's model changed) is not
    damage: it raises ValueError naming the first differing array, and nothing is moved.
    """
    damaged = []
    _quiet_failed_restore_leftovers()
    for step in sorted(manager.all_steps(), reverse=True):
        mismatch = _first_mismatch(manager, step, {"state": abstract_state, "ema_params": abstract_ema})
        if mismatch is not None:
            raise ValueError(f"checkpoint step {step} in {manager.directory} was written for another model or "
                             f"optimizer: {mismatch}. Resume with the config it was trained with (a copy is in "
                             "workdir/config.json and in each checkpoint's meta) or use a new workdir.")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                ema_params=ocp.args.StandardRestore(abstract_ema),
                meta=ocp.args.JsonRestore(),
            ))
            _verify(restored, ("state", "ema_params"))
        # Orbax and TensorStore raise many types for a damaged file (ValueError,
        # FileNotFoundError, a bare Exception); any of them means "not this step".
        except Exception as err:  # pylint: disable=broad-except
            logging.warning("Checkpoint step %d in %s is damaged and cannot be restored (%s: %s); "
                            "falling back to the next older checkpoint.", step, manager.directory,
                            type(err).__name__, str(err).splitlines()[0][:300])
            damaged.append(step)
            continue
        _move_all_aside(manager, damaged, move_damaged)
        return Restored(step, restored["state"], restored["ema_params"], dict(restored["meta"]))
    if damaged and not fresh_start_if_damaged:
        raise AllCheckpointsDamaged(
            f"every checkpoint in {manager.directory} is damaged (steps {damaged}; the warnings above say how), so "
            "there is nothing to resume. They are left in place. Rerun with --fresh_start_if_damaged "
            f"(train_and_evaluate(..., fresh_start_if_damaged=True)) to move them to "
            f"{os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)} and train from step 0.")
    _move_all_aside(manager, damaged, move_damaged)
    return None


def _move_all_aside(manager: ocp.CheckpointManager, steps: list[int], move: bool) -> None:
    for step in steps if move else ():
        logging.warning("Moving damaged checkpoint step %d to %s.", step,
                        os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR))
        _move_aside(manager, step)


def _single_device_target(metadata_tree: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata_tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


class EmaParams(NamedTuple):
    params: Any  # the EMA parameter pytree, on the first local device
    config: ml_collections.ConfigDict  # the config the checkpoint was trained with
    step: int


def load_item(workdir: str, item: str, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """(item's pytree on the first local device, the meta dict, step) of the newest readable checkpoint or `step`.

    item: 'state' (a dict: step, params, opt_state, counters) or 'ema_params'.
    Works on any device count. Damaged steps are skipped with a warning but not
    moved. Raises FileNotFoundError when no checkpoint can be read.
    """
    manager = make_manager(workdir, read_only=True)
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    _quiet_failed_restore_leftovers()
    try:
        for candidate in steps:
            try:
                target = _single_device_target(manager.item_metadata(candidate)[item])
                restored = manager.restore(candidate, args=ocp.args.Composite(
                    **{item: ocp.args.StandardRestore(target)}, meta=ocp.args.JsonRestore()))
                _verify(restored, (item,))
            except Exception as err:  # pylint: disable=broad-except  (see restore_latest)
                logging.warning("Checkpoint step %d in %s cannot be read (%s: %s); trying an older one.",
                                candidate, manager.directory, type(err).__name__, str(err).splitlines()[0][:300])
                continue
            return restored[item], dict(restored["meta"]), candidate
    finally:
        manager.close()
    raise FileNotFoundError(f"no readable checkpoint {'' if step is None else f'at step {step} '}under "
                            f"{os.path.join(workdir, CHECKPOINT_DIR)}")


def load_ema_params(workdir: str, step: int | None = None) -> EmaParams:
    """The EMA weights (and training config) of the newest intact checkpoint, for sampling and evaluation."""
    params, meta, step = load_item(workdir, "ema_params", step)
    return EmaParams(params, config_from_json(meta["config"]), step)
