"""One record per (σ choice, K, seed): the bound, sample quality and sampling time.

For each σ record (ddpm_jax.variances), each spacing (even, quad, uniform, or the optimal
trajectory of Bao et al. 2022 §4 for that record), each K and each seed it measures
  - the variational bound in bits/dim on the K-step sub-chain (`nll.nll_bpd_by_variance`;
    DDIM's with its q_σ), and its paired difference to the reference record's;
  - sample quality (`ddpm_jax.evaluation.quality`);
  - sampling wall time of the compiled sampler (compilation timed apart).
Common random numbers: for one seed every setting starts from the same x_T and noise keys,
and every bound uses the same x_t draws, so differences between σ choices are less noisy
than the per-setting spread. The statistics the records need (Γ_t for analytic) are
estimated once, on training images, at the union of the kept steps.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.tree_util import Partial

from ddpm_jax import checkpoints, from_config, sampling, schedules, statistics, trajectories, variances
from ddpm_jax.evaluation import nll

from experiments.sigma_ablation import settings

Array = jax.Array


def load_model(workdir: str, step: int | None = None):
    """(model_fn, schedule, training config, step) from the EMA weights of a training run's checkpoint.

    model_fn = Partial(apply, params) with every output channel (2C for a learned variance): the
    weights are a traced argument of the compiled sampler and bound, not constants folded into it.
    """
    ema = checkpoints.load_ema_params(workdir, step)
    return from_config.model_fn(ema.config, ema.params), from_config.build_schedule(ema.config), ema.config, ema.step


def compile_sampler(model_fn: Partial, schedule, record: variances.Variance, steps: np.ndarray,
                    shape: tuple[int, ...], *, config: ml_collections.ConfigDict, mean_type: str,
                    stats: dict[str, np.ndarray]):
    """(compiled f(model_fn, rng) -> samples [B, ...], seconds to compile): sampling.sample ahead of time."""
    c = config.conventions

    def run(model_fn, rng):
        fn = model_fn if record.from_network else statistics.mean_output_fn(model_fn)
        return sampling.sample(fn, schedule, rng, shape, steps=steps, variance=record,
                               stats=stats, decoder=decoder_of(config), sigma_clip_steps=c.sigma_clip_steps,
                               sigma_clip_pixel=c.sigma_clip_pixel, mean_type=mean_type,
                               clip_x0=config.sample.clip_x0)

    start = time.perf_counter()
    compiled = jax.jit(run).lower(model_fn, jax.random.PRNGKey(0)).compile()
    return compiled, time.perf_counter() - start


def decoder_of(config: ml_collections.ConfigDict) -> str | None:
    """The decoder-step convention for every record: a key of variances.DECODERS, or None for each record's own."""
    return None if config.conventions.decoder == "own" else config.conventions.decoder


def draw_samples(compiled, model_fn: Partial, rng: Array, num_samples: int, batch_size: int):
    """(samples [num_samples, ...] as NumPy, wall seconds): batches from fold_in(rng, b), timed to completion."""
    batches, start = [], time.perf_counter()
    for b in range(math.ceil(num_samples / batch_size)):
        batches.append(compiled(model_fn, jax.random.fold_in(rng, b)).block_until_ready())
    seconds = time.perf_counter() - start
    return np.concatenate([np.asarray(x) for x in batches])[:num_samples], seconds


def estimate_statistics(records, model_fn, schedule, config, train_images, mean_type) -> dict[str, np.ndarray]:
    """Every statistic the records need, once: at all T steps when a trajectory is optimised (its pair costs need
    Γ_t and E||ε − ε_θ||²/d everywhere, `trajectories.estimate_step_statistics`), else at the union of the
    kept steps of every (spacing, K)."""
    T = schedule.num_timesteps
    data = train_images[: config.gamma.num_examples]
    rng = jax.random.PRNGKey(config.gamma.seed)
    start = time.perf_counter()
    if OPTIMAL in config.spacings:
        stats = trajectories.estimate_step_statistics(model_fn, schedule, data, rng,
                                                      batch_size=config.gamma.batch_size, mean_type=mean_type)
        steps = np.arange(T)
    else:
        needs = [stat for record in records for stat in record.needs]
        if not needs:
            return {}
        steps = np.unique(np.concatenate([schedules.kept_steps(T, k, spacing) for k in config.num_steps
                                          for spacing in config.spacings]))
        stats = nll.estimate_stats(needs, model_fn, schedule, data, rng, steps=steps,
                                   batch_size=config.gamma.batch_size, mean_type=mean_type)
    logging.info("%s at %d steps from %d training images in %.1f s", sorted(stats), len(steps), len(data),
                 time.perf_counter() - start)
    return stats


OPTIMAL = "optimal"  # the spacing whose steps minimise the bound (Bao et al. 2022 §4), per σ choice and K


def optimisable(record: variances.Variance) -> bool:
    """A trajectory can be optimised for records whose σ² is a function of the chain (not the network's, not DDIM<1)."""
    return not record.from_network and record.ddim_eta in (None, 1.0)


def trajectory_costs(records, model_fn, schedule, config, train_images, mean_type, stats) -> dict:
    """{record name: trajectories.PairCosts} for the records whose trajectory is optimised."""
    if OPTIMAL not in config.spacings:
        return {}
    data = train_images[: config.gamma.num_examples]
    costs = {}
    for record in records:
        if not optimisable(record):
            logging.info("No optimal trajectory for %s (σ² from the network or DDIM η<1)", record.name)
            continue
        start = time.perf_counter()
        costs[record.name], _ = trajectories.estimate_pair_costs(
            model_fn, schedule, data, jax.random.PRNGKey(config.gamma.seed + 1), record, stats=stats,
            decoder=decoder_of(config), batch_size=config.gamma.batch_size, mean_type=mean_type)
        logging.info("Pair costs of %s in %.1f s", record.name, time.perf_counter() - start)
    return costs


def kept_for(record, spacing: str, num_steps: int, T: int, costs: dict) -> np.ndarray | None:
    """The steps of a (record, spacing, K) cell; None when the record has no trajectory of that spacing."""
    if spacing != OPTIMAL:
        return schedules.kept_steps(T, num_steps, spacing)
    if record.name not in costs:
        return None
    return trajectories.optimal_steps(costs[record.name].matrix, num_steps)


def paired_difference(total: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-image differences of two bounds on the same images and x_t draws."""
    diff = np.asarray(total, np.float64) - np.asarray(reference, np.float64)
    return float(diff.mean()), nll.standard_error(diff)


def bounds_for_cell(model_fn, schedule, records, kept_by_record, test_images, key, config, mean_type, stats):
    """{name: nll result} for records with a bound; records sharing the same steps share one pass (and x_t)."""
    groups: dict[tuple, list] = {}
    for record in records:
        kept = kept_by_record.get(record.name)
        if record.has_bound and kept is not None:
            groups.setdefault(tuple(kept.tolist()), []).append(record)
    out = {}
    for steps, group in groups.items():
        out.update(nll.nll_bpd_by_variance(model_fn, schedule, test_images, key, variances=group, steps=list(steps),
                                           stats=stats, decoder=decoder_of(config), batch_size=config.nll.batch_size,
                                           mean_type=mean_type, clip_x0=config.nll.clip_x0))
    return out


def run_ablation(model_fn: Partial, schedule, config: ml_collections.ConfigDict, *, trained: variances.Variance,
                 mean_type: str, train_images: np.ndarray, test_images: np.ndarray,
                 quality_fn: Callable[[np.ndarray, int], dict[str, float]] | None):
    """Every (σ choice, spacing, K, seed) of `config` -> (records [dict], grids {(setting, spacing, K): samples}).

    config.sample.num_samples = 0 computes the bounds alone (no sampling, quality or timing).
    schedule: the full T-step chain of the model. train_images feed the statistics (Analytic-DPM
    estimates Γ_t on training data) and the pair costs of optimal trajectories; test_images
    [N, ...] on the 8-bit grid are the split the bound is averaged over. Each row also holds its
    bound's paired difference to config.reference's (same images, same x_t draws).
    """
    choices = settings.sigma_choices(config, trained)
    T = schedule.num_timesteps
    sampling_on = config.sample.num_samples > 0  # 0: the bound only
    sample_batch = max(1, min(config.sample.batch_size, config.sample.num_samples))
    shape = (sample_batch,) + tuple(test_images.shape[1:])
    stats = estimate_statistics(choices, model_fn, schedule, config, train_images, mean_type)
    costs = trajectory_costs(choices, model_fn, schedule, config, train_images, mean_type, stats)

    rows, grids = [], {}
    for spacing in config.spacings:
        for num_steps in config.num_steps:
            kept_by_record = {r.name: kept_for(r, spacing, num_steps, T, costs) for r in choices}
            compiled = {}
            for seed in config.seeds:
                key = jax.random.PRNGKey(seed)
                bounds = bounds_for_cell(model_fn, schedule, choices, kept_by_record, test_images,
                                         jax.random.fold_in(key, 1), config, mean_type, stats)
                reference = bounds.get(config.reference)
                for record in choices:
                    kept = kept_by_record[record.name]
                    if kept is None:
                        continue
                    row = dict(setting=record.name, eta=record.ddim_eta, spacing=spacing, K=num_steps, seed=seed,
                               decoder=config.conventions.decoder, note=record.bound_note)
                    if spacing == OPTIMAL:
                        row["steps"] = " ".join(map(str, kept.tolist()))
                    if sampling_on:
                        if record.name not in compiled:
                            compiled[record.name] = compile_sampler(model_fn, schedule, record, kept, shape,
                                                                    config=config, mean_type=mean_type, stats=stats)
                        fn, compile_s = compiled[record.name]
                        samples, sample_s = draw_samples(fn, model_fn, jax.random.fold_in(key, 0),
                                                         config.sample.num_samples, sample_batch)
                        row.update(num_samples=len(samples), sample_time_s=sample_s, compile_time_s=compile_s)
                        if quality_fn is not None:
                            row.update(quality_fn(samples, seed))
                        if seed == config.seeds[0]:
                            grids[(record.name, spacing, num_steps)] = samples[: config.grid_size]
                    if record.name in bounds:
                        bound = bounds[record.name]
                        row.update(nll_bpd=bound["mean"], nll_stderr=bound["stderr"],
                                   nll_examples=bound["num_examples"])
                        if reference is not None:
                            row["nll_diff"], row["nll_diff_se"] = paired_difference(bound["total"], reference["total"])
                    rows.append(row)
                    logging.info("%s %s K=%d seed=%d: %s", record.name, spacing, num_steps, seed,
                                 {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    return rows, grids
