"""The ablation's files as a store of finished work: atomic writes, the run's identity, the statistics cache.

Output directory:
  run_config.json    the identity of the run (config without where files go, checkpoint step and CRC);
                     a rerun with another identity is refused, naming the changed fields
  cells/             one file per finished cell (`cells.py`), written whole or not at all
Cache directory (config.cache_dir, default <workdir>/sigma_ablation/cache, shared by every output
directory of that workdir): <kind>_<hash>.npz, the hash over the checkpoint and the config fields
that produced the arrays, which the file also holds (`__meta__`) so a reader can see where it came from.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

MANIFEST = "run_config.json"
CELLS_DIR = "cells"
NOT_COMPARED = ("output_dir", "cache_dir")  # where files go, not what they hold
TMP_TAG = ".tmp."


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """write(binary file) into a temporary sibling, then os.replace: a reader sees the old file or the whole new one."""
    tmp = f"{path}{TMP_TAG}{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def remove_stale_temporaries(directory: str) -> None:
    """Temporary files of a killed writer (never read: only os.replace publishes a file)."""
    for path in glob.glob(os.path.join(directory, "**", f"*{TMP_TAG}*"), recursive=True):
        os.remove(path)


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _plain(tree: Any) -> Any:
    """JSON's view of a value (tuples become lists), so a config and its saved copy compare equal."""
    return json.loads(json.dumps(tree, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def identity(config: ml_collections.ConfigDict, checkpoint: dict) -> dict:
    """What decides the run's numbers: the config without NOT_COMPARED, and the checkpoint (step, CRC)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_COMPARED}
    return _plain(dict(config=fields, checkpoint=checkpoint))


def changed_fields(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(_plain(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def open_output_dir(out_dir: str, ident: dict, *, new_output_dir: bool, writer: bool) -> str:
    """The directory this run writes: out_dir when it is new or was started by the same identity; with
    new_output_dir the first <out_dir>_<n> that is; else one ValueError naming the changed fields.
    Only the writer (process 0) creates the directory and its manifest."""
    candidate, n = out_dir, 0
    while os.path.exists(os.path.join(candidate, MANIFEST)):
        changed = changed_fields(read_json(os.path.join(candidate, MANIFEST)), ident)
        if not changed:
            break
        if not new_output_dir:
            raise ValueError(f"{candidate} holds a run with another config or checkpoint; changed: {', '.join(changed)}. "
                             "Rerun with the same config to resume, pass --new_output_dir to start a new directory "
                             "beside it, or set --config.output_dir")
        n += 1
        candidate = f"{out_dir.rstrip(os.sep)}_{n}"
    if writer:
        os.makedirs(os.path.join(candidate, CELLS_DIR), exist_ok=True)
        remove_stale_temporaries(candidate)
        if not os.path.exists(os.path.join(candidate, MANIFEST)):
            write_json(os.path.join(candidate, MANIFEST), ident)
    if candidate != out_dir:
        logging.info("Config changed against %s: writing to %s", out_dir, candidate)
    return candidate


class Cache:
    """Arrays that are expensive to compute, named by a hash of the checkpoint and the fields that produced them.

    load() returns None on a miss; only the writer saves. Every hit and miss is logged with its cost, and
    `events` keeps (kind, 'reused'|'computed', seconds) for run_info.json.
    """

    def __init__(self, directory: str, checkpoint: dict, *, writer: bool):
        self.directory, self.checkpoint, self.writer = directory, _plain(checkpoint), writer
        self.events: list[tuple[str, str, float]] = []
        if writer:
            os.makedirs(directory, exist_ok=True)
            remove_stale_temporaries(directory)

    def _meta(self, kind: str, fields: dict) -> dict:
        return _plain(dict(kind=kind, checkpoint=self.checkpoint, fields=fields))

    def path(self, kind: str, fields: dict) -> str:
        return os.path.join(self.directory, f"{kind}_{fingerprint(self._meta(kind, fields))}.npz")

    def get(self, kind: str, fields: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays of (kind, fields): read from the cache when there, else compute() and save them."""
        path, meta = self.path(kind, fields), self._meta(kind, fields)
        start = time.perf_counter()
        if os.path.exists(path):
            arrays = read_npz(path)
            if json.loads(str(arrays.pop("__meta__"))) == meta:
                seconds = time.perf_counter() - start
                self.events.append((kind, "reused", seconds))
                logging.info("Reused %s from %s (%.2f s)", kind, path, seconds)
                return arrays
            logging.warning("%s does not hold %s of this run (hash collision?); recomputing", path, kind)
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        seconds = time.perf_counter() - start
        self.events.append((kind, "computed", seconds))
        logging.info("Computed %s in %.1f s%s", kind, seconds, f"; saved to {path}" if self.writer else "")
        if self.writer:
            write_npz(path, {**arrays, "__meta__": np.array(json.dumps(meta))})
        return arrays
