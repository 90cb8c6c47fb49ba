"""Metrics to TensorBoard event files and to a plain metrics.jsonl, written by process 0 only."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np


class MetricWriter:
    """Scalars and images of one run under `logdir`; a no-op on processes other than 0.

    metrics.jsonl holds one JSON object per call to `write_scalars`: {"step": s, name: value, ...},
    so a run can be plotted without TensorBoard.
    """

    def __init__(self, logdir: str):
        self.active = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.active:
            # Imported here: tensorboardX pulls in protobuf, which only the writing process needs.
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._tb = SummaryWriter(logdir)
            self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in scalars.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: uint8 [H, W, C]."""
        if self.active:
            self._tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._jsonl.close()


def drop_metrics_after(logdir: str, step: int) -> None:
    """Removes the rows of logdir/metrics.jsonl with a step > `step` (process 0; atomic: a rewritten copy replaces it).

    A resumed run recomputes the steps after its checkpoint; without this, their
    rows from the interrupted run would stay beside the new ones. A row cut off
    mid-line by a crash is dropped too. (TensorBoard event files keep both: TensorBoard shows the newer.)
    """
    path = os.path.join(logdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_metrics(logdir: str) -> list[dict]:
    """The rows of logdir/metrics.jsonl, in order."""
    with open(os.path.join(logdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
