"""The σ_t ablation: every reverse-variance choice × number of sampling steps K, for one trained model.

For each σ choice (fixed_large σ² = β, fixed_small σ² = β̃ (Ho et al. 2020 §3.2),
learned_range (Nichol & Dhariwal 2021 eq. 15, only for a model trained with it),
analytic (Bao et al. 2022 Thm. 1) and DDIM η (Song et al. 2021 eq. 12, 16)), each K
and each seed it measures
  - the variational bound in bits/dim on the K-step sub-chain (`nll.nll_bpd`),
    where the choice defines a Gaussian reverse density whose bound we compute;
  - sample quality: FDD/KID/IS on the digits classifier's features, or
    FID/IS/KID on Inception features when the weights file is given;
  - sampling wall time of the compiled sampler (compilation timed apart).
Common random numbers: for one seed every setting starts from the same x_T and
noise keys, and every bound uses the same x_t draws, so differences between σ
choices are less noisy than the per-setting spread.

`run_ablation` returns one record per (setting, K, seed); `aggregate` turns
them into rows with mean and std over seeds; `write_csv`/`markdown_table` report them.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.tree_util import Partial

from ddpm_jax import checkpoints, diffusion, sampling, train
from ddpm_jax.evaluation import classifier, inception, metrics, nll

Array = jax.Array
QUALITY_KINDS = ("auto", "digits", "inception", "none")


@dataclasses.dataclass(frozen=True)
class SigmaChoice:
    name: str  # row label: a variance name or 'ddim_eta<η>'
    variance: str  # the sampler's variance argument
    eta: float | None  # DDIM η; None for ancestral sampling
    bound_variance: str | None  # the reverse density whose bound is reported; None: no bound
    note: str = ""  # why there is no bound, or what it equals


def _ddim_choice(eta: float) -> SigmaChoice:
    name = f"ddim_eta{eta:g}"
    if eta == 1.0:
        return SigmaChoice(name, "fixed_small", eta, "fixed_small",
                           "DDIM η=1 is ancestral sampling with σ²=β̃ (Song et al. eq. 16): its bound is fixed_small's")
    if eta == 0.0:
        return SigmaChoice(name, "fixed_small", eta, None,
                           "DDIM η=0 is deterministic given x_T: p(x_{t−1}|x_t) is a point mass, no bound exists")
    return SigmaChoice(name, "fixed_small", eta, None,
                       f"DDIM 0<η<1 is Gaussian but its bound needs the non-Markovian posterior q_σ "
                       f"(Song et al. eq. 7), which is not implemented; it grows as 1/η² for η→0")


def sigma_choices(variances: tuple[str, ...], ddim_etas: tuple[float, ...], trained_variance: str) -> list[SigmaChoice]:
    """The settings to run. A learned variance is kept only when it is the one the model was trained with."""
    choices = []
    for variance in variances:
        if variance in diffusion.LEARNED_VARIANCES and variance != trained_variance:
            logging.info("Skipping %s: the model was trained with variance=%s.", variance, trained_variance)
            continue
        choices.append(SigmaChoice(variance, variance, None, variance))
    return choices + [_ddim_choice(float(eta)) for eta in ddim_etas]


# --------------------------------------------------------------------------
# Config validation (before anything is loaded or compiled).


def _fail(path: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{path} must be {allowed}, got {value!r}")


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def validate_config(config: ml_collections.ConfigDict, num_timesteps: int | None = None) -> None:
    """One ValueError naming the first bad field of an ablation config; K ≤ T is checked once T is known."""
    if not config.variances and not config.ddim_etas:
        _fail("variances/ddim_etas", "not both empty", (config.variances, config.ddim_etas))
    for v in config.variances:
        if v not in diffusion.VARIANCES:
            _fail("variances", f"a tuple of names from {sorted(diffusion.VARIANCES)}", tuple(config.variances))
    for eta in config.ddim_etas:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            _fail("ddim_etas", "a tuple of floats in [0, 1]", tuple(config.ddim_etas))
    maximum = num_timesteps if num_timesteps is not None else math.inf
    if not config.num_steps or not all(_is_int(k, 1) and k <= maximum for k in config.num_steps):
        _fail("num_steps", f"a non-empty tuple of ints in [1, T={num_timesteps or 'T'}]", tuple(config.num_steps))
    if config.spacing not in ("even", "quad"):
        _fail("spacing", "'even' or 'quad'", config.spacing)
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
    if config.quality.kind not in QUALITY_KINDS:
        _fail("quality.kind", f"one of {QUALITY_KINDS}", config.quality.kind)


# --------------------------------------------------------------------------
# The model from a training run.


def load_model(workdir: str, step: int | None = None):
    """(model_fn, schedule, training config, step) from the EMA weights of a training run's checkpoint.

    model_fn = Partial(apply, params) with every output channel (2C for a learned
    variance): the weights are a traced argument of the compiled sampler and
    bound, not constants folded into it.
    """
    ema = checkpoints.load_ema_params(workdir, step)
    model_fn = train.eval_model_fn(ema.config, ema.params, ema.config.diffusion.variance)
    return model_fn, train.build_schedule(ema.config), ema.config, ema.step


# --------------------------------------------------------------------------
# Sample quality.


def quantize(images: np.ndarray) -> np.ndarray:
    """Samples rounded to the 8-bit grid, as saving them to PNG would (the reference data are on it)."""
    return (np.clip(np.round((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255) / 127.5 - 1.0).astype(np.float32)


def resolve_quality_kind(kind: str, dataset: str, inception_weights: str | None) -> str:
    """'auto': FID/IS/KID when an Inception weights file is given, else the digits classifier for digits, else none."""
    if kind != "auto":
        return kind
    if inception_weights:
        return "inception"
    return "digits" if dataset == "digits" else "none"


def digits_quality_fn(train_images, train_labels, reference_images, *, seed: int, classifier_steps: int,
                      kid_subsets: int) -> Callable[[np.ndarray, int], dict[str, float]]:
    """score(samples [N, 8, 8, 1], seed) -> {fdd, kid, digits_is} against reference_images (see classifier.py)."""
    params, accuracy = classifier.train_feature_classifier(train_images, train_labels, rng=jax.random.PRNGKey(seed),
                                                           num_steps=classifier_steps)
    logging.info("Digits feature classifier: train accuracy %.3f", accuracy)

    def score(samples, seed):
        m = classifier.digits_sample_quality(params, quantize(samples), reference_images,
                                             rng=np.random.default_rng(seed), kid_subsets=kid_subsets)
        return {"fdd": m["fdd"], "kid": m["kid_mean"], "digits_is": m["is_mean"]}

    return score


def inception_quality_fn(reference_images, *, weights: str | None,
                         kid_subsets: int) -> Callable[[np.ndarray, int], dict[str, float]]:
    """score(samples, seed) -> {fid, kid, inception_is} on FID-Inception features (Heusel et al. 2017)."""
    variables = inception.load_inception_variables(weights)
    ref_features, _ = inception.inception_features(variables, reference_images)
    ref_stats = metrics.feature_statistics(ref_features)

    def score(samples, seed):
        features, logits = inception.inception_features(variables, quantize(samples))
        subset = min(1000, len(features), len(ref_features))
        kid, _ = metrics.kernel_inception_distance(ref_features, features, rng=np.random.default_rng(seed),
                                                   num_subsets=kid_subsets, subset_size=subset)
        is_mean, _ = metrics.inception_score(logits, num_splits=min(10, len(logits)))
        return {"fid": metrics.frechet_distance(*ref_stats, *metrics.feature_statistics(features)),
                "kid": kid, "inception_is": is_mean}

    return score


# --------------------------------------------------------------------------
# One setting.


def compile_sampler(model_fn: Partial, schedule, choice: SigmaChoice, num_steps: int, shape: tuple[int, ...], *,
                    spacing: str, mean_type: str, clip_x0: bool, gamma: np.ndarray | None):
    """(compiled f(model_fn, rng) -> samples [B, ...], seconds to compile): sampling.sample ahead of time."""
    learned = choice.variance in diffusion.LEARNED_VARIANCES

    def run(model_fn, rng):
        fn = model_fn if learned else nll.mean_output_fn(model_fn)
        return sampling.sample(fn, schedule, rng, shape, num_steps=num_steps, spacing=spacing,
                               variance=choice.variance, eta=choice.eta, mean_type=mean_type, clip_x0=clip_x0,
                               gamma=gamma if choice.variance == "analytic" else None)

    start = time.perf_counter()
    compiled = jax.jit(run).lower(model_fn, jax.random.PRNGKey(0)).compile()
    return compiled, time.perf_counter() - start


def draw_samples(compiled, model_fn: Partial, rng: Array, num_samples: int, batch_size: int):
    """(samples [num_samples, ...] as NumPy, wall seconds): batches from fold_in(rng, b), timed to completion."""
    batches, start = [], time.perf_counter()
    for b in range(math.ceil(num_samples / batch_size)):
        batches.append(compiled(model_fn, jax.random.fold_in(rng, b)).block_until_ready())
    seconds = time.perf_counter() - start
    return np.concatenate([np.asarray(x) for x in batches])[:num_samples], seconds


# --------------------------------------------------------------------------
# The whole ablation.


def run_ablation(model_fn: Partial, schedule, config: ml_collections.ConfigDict, *, trained_variance: str,
                 mean_type: str, train_images: np.ndarray, test_images: np.ndarray,
                 quality_fn: Callable[[np.ndarray, int], dict[str, float]] | None):
    """Every (σ choice, K, seed) of `config` -> (records [dict], grids {(setting, K): samples of the first seed}).

    config.sample.num_samples = 0 computes the bounds alone (no sampling, quality or timing).
    schedule: the full T-step chain of the model. train_images feed Γ_t
    (Analytic-DPM estimates it on training data); test_images [N, ...] on the
    8-bit grid are the split the bound is averaged over.
    """
    choices = sigma_choices(tuple(config.variances), tuple(config.ddim_etas), trained_variance)
    num_timesteps = schedule.num_timesteps
    sampling_on = config.sample.num_samples > 0  # 0: the bound only
    sample_batch = max(1, min(config.sample.batch_size, config.sample.num_samples))
    shape = (sample_batch,) + tuple(test_images.shape[1:])

    gamma = None
    if any(c.variance == "analytic" for c in choices):
        steps = np.unique(np.concatenate([nll.kept_steps(num_timesteps, k, config.spacing) for k in config.num_steps]))
        start = time.perf_counter()
        gamma = nll.estimate_gamma(model_fn, schedule, train_images[: config.gamma.num_examples],
                                   jax.random.PRNGKey(config.gamma.seed), batch_size=config.gamma.batch_size,
                                   steps=steps, mean_type=mean_type)
        logging.info("Γ_t at %d steps from %d training images in %.1f s", len(steps),
                     min(len(train_images), config.gamma.num_examples), time.perf_counter() - start)

    # One pass over the test split per (K, seed) gives the bound of every σ choice (shared network calls and x_t).
    bound_variances = tuple(dict.fromkeys(c.bound_variance for c in choices if c.bound_variance is not None))
    records, grids, bounds = [], {}, {}
    for num_steps in config.num_steps:
        for choice in choices:
            if sampling_on:
                compiled, compile_s = compile_sampler(model_fn, schedule, choice, num_steps, shape,
                                                      spacing=config.spacing, mean_type=mean_type,
                                                      clip_x0=config.sample.clip_x0, gamma=gamma)
            for seed in config.seeds:
                key = jax.random.PRNGKey(seed)
                record = dict(setting=choice.name, variance=choice.variance, eta=choice.eta, K=num_steps, seed=seed,
                              note=choice.note)
                if sampling_on:
                    samples, sample_s = draw_samples(compiled, model_fn, jax.random.fold_in(key, 0),
                                                     config.sample.num_samples, sample_batch)
                    record.update(num_samples=len(samples), sample_time_s=sample_s, compile_time_s=compile_s)
                    if quality_fn is not None:
                        record.update(quality_fn(samples, seed))
                    if seed == config.seeds[0]:
                        grids[(choice.name, num_steps)] = samples[: config.grid_size]
                if choice.bound_variance is not None:  # DDIM η=1 reads fixed_small's bound
                    if (num_steps, seed) not in bounds:
                        bounds[(num_steps, seed)] = nll.nll_bpd_by_variance(
                            model_fn, schedule, test_images, jax.random.fold_in(key, 1),
                            variances=bound_variances, num_steps=num_steps, spacing=config.spacing,
                            gamma=gamma, batch_size=config.nll.batch_size, mean_type=mean_type,
                            clip_x0=config.nll.clip_x0)
                    bound = bounds[(num_steps, seed)][choice.bound_variance]
                    record.update(nll_bpd=bound["mean"], nll_stderr=bound["stderr"], nll_examples=bound["num_examples"])
                records.append(record)
                logging.info("%s K=%d seed=%d: %s", choice.name, num_steps, seed,
                             {k: round(v, 4) for k, v in record.items() if isinstance(v, float)})
    return records, grids


# --------------------------------------------------------------------------
# Aggregation and reports.

ID_FIELDS = ("setting", "variance", "eta", "K")
METRICS = ("nll_bpd", "fdd", "fid", "kid", "digits_is", "inception_is", "sample_time_s")
LABELS = {"nll_bpd": "NLL bound (bits/dim)", "fdd": "FDD", "fid": "FID", "kid": "KID",
          "digits_is": "digits IS", "inception_is": "IS", "sample_time_s": "sampling time (s)"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1) over seeds; std is NaN for one seed."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (setting, K), in first-seen order: <metric>_mean/_std over seeds for each metric present."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[f] for f in ID_FIELDS), []).append(record)
    rows = []
    for ids, group in groups.items():
        row = dict(zip(ID_FIELDS, ids), num_seeds=len(group), num_samples=group[0].get("num_samples", 0),
                   compile_time_s=group[0].get("compile_time_s", math.nan))
        for metric in METRICS:
            if metric in group[0]:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        if "nll_stderr" in group[0]:
            row["nll_stderr_mean"] = float(np.mean([r["nll_stderr"] for r in group]))
            row["nll_examples"] = group[0]["nll_examples"]
        row["note"] = group[0]["note"]
        rows.append(row)
    return rows


INT_FIELDS = ("K", "seed", "num_samples", "nll_examples")
TEXT_FIELDS = ("setting", "variance", "note")


def read_records(path: str) -> list[dict]:
    """The records `write_csv` wrote (per_seed.csv), numbers parsed back and empty cells left out."""
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            record = {}
            for key, cell in row.items():
                if key in TEXT_FIELDS:
                    record[key] = cell
                elif key == "eta":
                    record[key] = float(cell) if cell else None
                elif cell != "":
                    record[key] = int(cell) if key in INT_FIELDS else float(cell)
            records.append(record)
    return records


def _columns(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return [c for c in columns if c != "note"] + ["note"]


def write_csv(rows: list[dict], path: str) -> None:
    """rows (aggregate or raw records) as CSV; a missing or NaN value is an empty cell."""
    columns = _columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None or (isinstance(row.get(c), float) and math.isnan(row[c]))
                             else row[c] for c in columns})


def _cell(row: dict, metric: str) -> str:
    """'mean ± std', both to the decimal of the std's second significant digit (at most 4 decimals)."""
    mean = row.get(f"{metric}_mean")
    if mean is None or math.isnan(mean):
        return "—"
    std = row[f"{metric}_std"]
    if math.isnan(std):
        return f"{mean:.4g}"
    decimals = 4 if std <= 0.0 else min(4, max(0, 1 - math.floor(math.log10(std))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def markdown_table(rows: list[dict]) -> str:
    """A markdown table (mean ± std over seeds), with the notes of settings that have one as footnotes."""
    metrics_present = [m for m in METRICS if any(f"{m}_mean" in r for r in rows)]
    header = ["σ choice", "K"] + [LABELS[m] for m in metrics_present]
    with_se = "nll_bpd" in metrics_present
    if with_se:  # the Monte Carlo error of one seed's bound, over test images and noise draws
        header.insert(3, "s.e. of one bound")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: dict[str, str] = {}
    for row in rows:
        name = row["setting"]
        if row["note"]:
            notes.setdefault(name, row["note"])
            name += f" [{list(notes).index(name) + 1}]"
        cells = [_cell(row, m) for m in metrics_present]
        if with_se:
            se = row.get("nll_stderr_mean", math.nan)
            cells.insert(1, "—" if math.isnan(se) else f"{se:.2g}")
        lines.append("| " + " | ".join([name, str(row["K"])] + cells) + " |")
    lines.append("")
    lines += [f"[{i + 1}] {name}: {note}  " for i, (name, note) in enumerate(notes.items())]
    return "\n".join(lines) + "\n"
