"""The ablation's σ choices and config checks (before anything is loaded or compiled)."""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import losses, schedules, variances
from ddpm_jax.evaluation import quality


def sigma_choices(config: ml_collections.ConfigDict, trained: variances.Variance) -> list[variances.Variance]:
    """The records to run: config.variances (names, records or 'module:NAME'), then DDIM at each η.

    A record whose σ² comes from the network runs only when it is the one the model was trained
    with (only then does the model output it).
    """
    records = []
    for spec in config.variances:
        record = variances.get(spec)
        if record.from_network and record.name != trained.name:
            logging.info("Skipping %s: the model was trained with variance=%s.", record.name, trained.name)
            continue
        records.append(record)
    return records + [variances.ddim(eta) for eta in config.ddim_etas]


def reference_of(config: ml_collections.ConfigDict) -> str | None:
    """The σ choice rows are paired against; None for "" or None (a command-line override can only give a string)."""
    return None if config.reference in (None, "", "None") else config.reference


def _fail(path: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{path} must be {allowed}, got {value!r}")


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def validate_config(config: ml_collections.ConfigDict, num_timesteps: int | None = None) -> None:
    """One ValueError naming the first bad field of an ablation config; K ≤ T is checked once T is known."""
    if not config.variances and not config.ddim_etas:
        _fail("variances/ddim_etas", "not both empty", (config.variances, config.ddim_etas))
    for spec in config.variances:
        try:
            variances.check(variances.get(spec))
        except ValueError as err:
            raise ValueError(f"variances: {err}") from None
    names = [variances.get(s).name for s in config.variances]
    if len(set(names)) != len(names):
        _fail("variances", "distinct σ choices", tuple(names))
    for eta in config.ddim_etas:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            _fail("ddim_etas", "a tuple of floats in [0, 1]", tuple(config.ddim_etas))
    maximum = num_timesteps if num_timesteps is not None else math.inf
    if not config.num_steps or not all(_is_int(k, 1) and k <= maximum for k in config.num_steps):
        _fail("num_steps", f"a non-empty tuple of ints in [1, T={num_timesteps or 'T'}]", tuple(config.num_steps))
    allowed = (*schedules.SPACINGS, "optimal")
    if not config.spacings or not all(isinstance(v, str) and v in allowed for v in config.spacings) \
            or len(set(config.spacings)) != len(config.spacings):
        _fail("spacings", f"a non-empty tuple of distinct names from {allowed}", tuple(config.spacings))
    if reference_of(config) is not None and config.reference not in names:
        _fail("reference", f"'' (none) or one of the variances {names} (the row differences are paired against it)",
              config.reference)
    c = config.conventions
    if c.decoder != "own" and c.decoder not in variances.DECODERS:
        _fail("conventions.decoder", f"'own' (each record's default) or one of {sorted(variances.DECODERS)}", c.decoder)
    if not _is_int(c.sigma_clip_steps, 0):
        _fail("conventions.sigma_clip_steps", "an int >= 0 (0: no clipping)", c.sigma_clip_steps)
    if isinstance(c.sigma_clip_pixel, bool) or not isinstance(c.sigma_clip_pixel, (int, float)) \
            or not c.sigma_clip_pixel > 0:
        _fail("conventions.sigma_clip_pixel", "a float > 0 (8-bit levels)", c.sigma_clip_pixel)
    if c.cdf not in losses.CDFS:
        _fail("conventions.cdf", f"one of {losses.CDFS}", c.cdf)
    if not config.seeds or not all(_is_int(s, 0) for s in config.seeds):
        _fail("seeds", "a non-empty tuple of ints >= 0", tuple(config.seeds))
    for path in ("sample.num_samples", "sample.batch_size", "nll.batch_size", "gamma.num_examples",
                 "gamma.batch_size", "grid_size"):
        group, field = path.split(".") if "." in path else (None, path)
        value = config[group][field] if group else config[field]
        if path == "sample.num_samples":
            if not (_is_int(value, 2) or _is_int(value, 0) and value == 0):
                _fail(path, "0 (the bound only) or an int >= 2 (FDD needs a covariance)", value)
        elif not _is_int(value, 1):
            _fail(path, "an int >= 1", value)
    if config.nll.num_examples is not None and not _is_int(config.nll.num_examples, 2):
        _fail("nll.num_examples", "None (the whole split) or an int >= 2", config.nll.num_examples)
    if config.quality.kind not in quality.QUALITY_KINDS:
        _fail("quality.kind", f"one of {quality.QUALITY_KINDS}", config.quality.kind)
