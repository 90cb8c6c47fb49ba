"""One record per (σ choice, K, seed): the bound, sample quality and sampling time.

For each σ record (ddpm_jax.variances), each K and each seed it measures
  - the variational bound in bits/dim on the K-step sub-chain (`nll.nll_bpd_by_variance`),
    for the records that define a Gaussian reverse density with a bound;
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

from ddpm_jax import checkpoints, from_config, sampling, schedules, statistics, variances
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


def compile_sampler(model_fn: Partial, schedule, record: variances.Variance, num_steps: int,
                    shape: tuple[int, ...], *, config: ml_collections.ConfigDict, mean_type: str,
                    stats: dict[str, np.ndarray]):
    """(compiled f(model_fn, rng) -> samples [B, ...], seconds to compile): sampling.sample ahead of time."""
    c = config.conventions

    def run(model_fn, rng):
        fn = model_fn if record.from_network else statistics.mean_output_fn(model_fn)
        return sampling.sample(fn, schedule, rng, shape, num_steps=num_steps, spacing=config.spacing, variance=record,
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
    """Every statistic the records need, once, at the union of the kept steps of every K."""
    needs = [stat for record in records for stat in record.needs]
    if not needs:
        return {}
    T = schedule.num_timesteps
    steps = np.unique(np.concatenate([schedules.kept_steps(T, k, config.spacing) for k in config.num_steps]))
    start = time.perf_counter()
    stats = nll.estimate_stats(needs, model_fn, schedule, train_images[: config.gamma.num_examples],
                               jax.random.PRNGKey(config.gamma.seed), steps=steps,
                               batch_size=config.gamma.batch_size, mean_type=mean_type)
    logging.info("%s at %d steps from %d training images in %.1f s", sorted(stats), len(steps),
                 min(len(train_images), config.gamma.num_examples), time.perf_counter() - start)
    return stats


def run_ablation(model_fn: Partial, schedule, config: ml_collections.ConfigDict, *, trained: variances.Variance,
                 mean_type: str, train_images: np.ndarray, test_images: np.ndarray,
                 quality_fn: Callable[[np.ndarray, int], dict[str, float]] | None):
    """Every (σ choice, K, seed) of `config` -> (records [dict], grids {(setting, K): samples of the first seed}).

    config.sample.num_samples = 0 computes the bounds alone (no sampling, quality or timing).
    schedule: the full T-step chain of the model. train_images feed the statistics (Analytic-DPM
    estimates Γ_t on training data); test_images [N, ...] on the 8-bit grid are the split the
    bound is averaged over.
    """
    choices = settings.sigma_choices(config, trained)
    sampling_on = config.sample.num_samples > 0  # 0: the bound only
    sample_batch = max(1, min(config.sample.batch_size, config.sample.num_samples))
    shape = (sample_batch,) + tuple(test_images.shape[1:])
    stats = estimate_statistics(choices, model_fn, schedule, config, train_images, mean_type)

    # One pass over the test split per (K, seed) gives the bound of every σ choice (shared network calls and x_t).
    with_bound = [r for r in choices if r.has_bound]
    records, grids, bounds = [], {}, {}
    for num_steps in config.num_steps:
        for record in choices:
            if sampling_on:
                compiled, compile_s = compile_sampler(model_fn, schedule, record, num_steps, shape, config=config,
                                                      mean_type=mean_type, stats=stats)
            for seed in config.seeds:
                key = jax.random.PRNGKey(seed)
                row = dict(setting=record.name, eta=record.ddim_eta, K=num_steps, seed=seed, spacing=config.spacing,
                           decoder=config.conventions.decoder, note=record.bound_note)
                if sampling_on:
                    samples, sample_s = draw_samples(compiled, model_fn, jax.random.fold_in(key, 0),
                                                     config.sample.num_samples, sample_batch)
                    row.update(num_samples=len(samples), sample_time_s=sample_s, compile_time_s=compile_s)
                    if quality_fn is not None:
                        row.update(quality_fn(samples, seed))
                    if seed == config.seeds[0]:
                        grids[(record.name, num_steps)] = samples[: config.grid_size]
                if record.has_bound:
                    if (num_steps, seed) not in bounds:
                        bounds[(num_steps, seed)] = nll.nll_bpd_by_variance(
                            model_fn, schedule, test_images, jax.random.fold_in(key, 1), variances=with_bound,
                            num_steps=num_steps, spacing=config.spacing, stats=stats,
                            decoder=decoder_of(config), batch_size=config.nll.batch_size,
                            mean_type=mean_type, clip_x0=config.nll.clip_x0)
                    bound = bounds[(num_steps, seed)][record.name]
                    row.update(nll_bpd=bound["mean"], nll_stderr=bound["stderr"], nll_examples=bound["num_examples"])
                records.append(row)
                logging.info("%s K=%d seed=%d: %s", record.name, num_steps, seed,
                             {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    return records, grids
