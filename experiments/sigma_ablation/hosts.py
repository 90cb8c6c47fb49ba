"""The ablation over several processes (jax.distributed): each process's share of rows, and how the shares meet.

Rows are split in contiguous blocks, process p taking block p, and gathered in process order,
so a gathered array is the one process's array. Every random draw is per global row (the
sampler's noise per example, the bound's x_t per batch of the split), so a process computes its
rows exactly as one process would. Only process 0 writes files (`is_writer`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_writer() -> bool:
    return jax.process_index() == 0


def rows_per_process(total: int, granule: int = 1) -> int:
    """Rows each process computes so that every process has the same count, a multiple of granule (its
    local device count), and together at least `total`; the rows past `total` are computed and dropped."""
    return math.ceil(total / (jax.process_count() * granule)) * granule


def gather_rows(local: np.ndarray, total: int) -> np.ndarray:
    """Every process's equal-sized block [b, ...], in process order, cut to `total` rows."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local[:total]
    stacked = np.asarray(multihost_utils.process_allgather(local))  # [P, b, ...]
    return stacked.reshape(-1, *local.shape[1:])[:total]


def batch_share(num_batches: int) -> range:
    """The batches of a split (0..num_batches-1) this process evaluates: a contiguous block."""
    per = math.ceil(num_batches / jax.process_count())
    p = jax.process_index()
    return range(min(p * per, num_batches), min((p + 1) * per, num_batches))


def gather_batches(local: np.ndarray, num_batches: int, rows_of) -> np.ndarray:
    """Per-example values [n_local] of this process's `batch_share` -> the whole split's, in batch order.

    rows_of(b): the number of real rows of batch b. Values travel as float32: the bound's per-example
    totals are float32 results widened to float64, so nothing is lost.
    """
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    per = math.ceil(num_batches / jax.process_count())
    width = max(sum(rows_of(b) for b in range(p * per, min((p + 1) * per, num_batches)))
                for p in range(jax.process_count()))
    padded = np.zeros(width, np.float32)
    padded[: local.size] = local.astype(np.float32)
    assert np.array_equal(padded[: local.size].astype(local.dtype), local), "values not representable in float32"
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [P, width]
    counts = [sum(rows_of(b) for b in range(p * per, min((p + 1) * per, num_batches)))
              for p in range(jax.process_count())]
    return np.concatenate([stacked[p, :c] for p, c in enumerate(counts)]).astype(local.dtype)


def agree(flags: list[bool]) -> list[bool]:
    """Process 0's flags on every process (e.g. which cells are finished: only its view of the files counts)."""
    if jax.process_count() == 1:
        return list(flags)
    return [bool(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32)))]
