"""What one cell of the ablation computes: the statistics, the trajectories, the samples, the bound.

For each σ record (ddpm_jax.variances), each spacing (even, quad, uniform, or the optimal
trajectory of Bao et al. 2022 §4 for that record), each K and each seed the ablation measures
  - the variational bound in bits/dim on the K-step sub-chain (`nll.nll_bpd_by_variance`;
    DDIM's with its q_σ), and its paired difference to the reference record's;
  - sample quality (`ddpm_jax.evaluation.quality`);
  - sampling wall time of the compiled sampler (compilation timed apart).
Common random numbers: for one seed every setting starts from the same x_T and noise keys,
and every bound uses the same x_t draws, so differences between σ choices are less noisy
than the per-setting spread. The statistics the records need (Γ_t for analytic) are
estimated once, on training images, and kept in the cache (`store.Cache`) with the pair
costs of the optimal trajectories. Samples and bound batches are split over processes
(`hosts.py`); each example's noise is its own, so the split does not change the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.tree_util import Partial

from ddpm_jax import checkpoints, from_config, sampling, schedules, statistics, trajectories, variances
from ddpm_jax.evaluation import nll

from experiments.sigma_ablation import hosts
from experiments.sigma_ablation.store import Cache

Array = jax.Array
OPTIMAL = "optimal"  # the spacing whose steps minimise the bound (Bao et al. 2022 §4), per σ choice and K


def load_model(workdir: str, step: int | None = None):
    """(model_fn, schedule, training config, step) from the EMA weights of a training run's checkpoint.

    model_fn = Partial(apply, params) with every output channel (2C for a learned variance): the
    weights are a traced argument of the compiled sampler and bound, not constants folded into it. They are kept
    on the host (NumPy), uncommitted to a device, so the sampler can replicate them over every local device.
    """
    ema = checkpoints.load_ema_params(workdir, step)
    params = jax.device_get(ema.params)
    return from_config.model_fn(ema.config, params), from_config.build_schedule(ema.config), ema.config, ema.step


def decoder_of(config: ml_collections.ConfigDict) -> str | None:
    """The decoder-step convention for every record: a key of variances.DECODERS, or None for each record's own."""
    return None if config.conventions.decoder == "own" else config.conventions.decoder


def _gamma_fields(config, train_images, mean_type) -> dict:
    return dict(num_examples=len(train_images[: config.gamma.num_examples]), batch_size=config.gamma.batch_size,
                seed=config.gamma.seed, mean_type=mean_type)


def estimate_statistics(records, model_fn, schedule, config, train_images, mean_type, cache: Cache) -> dict:
    """Every statistic the records need, once (and once per checkpoint, through the cache): at all T steps when
    a trajectory is optimised (its pair costs need Γ_t and E||ε − ε_θ||²/d everywhere,
    `trajectories.estimate_step_statistics`), else at the union of the kept steps of every (spacing, K)."""
    T = schedule.num_timesteps
    data = train_images[: config.gamma.num_examples]
    rng = jax.random.PRNGKey(config.gamma.seed)
    fields = _gamma_fields(config, train_images, mean_type)
    if OPTIMAL in config.spacings:
        return cache.get("statistics", dict(fields, steps="all", names=["eps_mse", "gamma"]),
                         lambda: trajectories.estimate_step_statistics(
                             model_fn, schedule, data, rng, batch_size=config.gamma.batch_size, mean_type=mean_type))
    needs = list(dict.fromkeys(stat for record in records for stat in record.needs))
    if not needs:
        return {}
    steps = np.unique(np.concatenate([schedules.kept_steps(T, k, spacing) for k in config.num_steps
                                      for spacing in config.spacings]))
    return cache.get("statistics", dict(fields, steps=steps.tolist(), names=sorted(s.name for s in needs)),
                     lambda: nll.estimate_stats(needs, model_fn, schedule, data, rng, steps=steps,
                                                batch_size=config.gamma.batch_size, mean_type=mean_type))


def optimisable(record: variances.Variance) -> bool:
    """A trajectory can be optimised for records whose σ² is a function of the chain (not the network's, not DDIM<1)."""
    return not record.from_network and record.ddim_eta in (None, 1.0)


def trajectory_costs(records, model_fn, schedule, config, train_images, mean_type, stats, cache: Cache) -> dict:
    """{record name: trajectories.PairCosts} for the records whose trajectory is optimised (cached per record)."""
    if OPTIMAL not in config.spacings:
        return {}
    data = train_images[: config.gamma.num_examples]
    fields = _gamma_fields(config, train_images, mean_type)
    costs = {}
    for record in records:
        if not optimisable(record):
            logging.info("No optimal trajectory for %s (σ² from the network or DDIM η<1)", record.name)
            continue

        def compute(record=record):
            c, _ = trajectories.estimate_pair_costs(
                model_fn, schedule, data, jax.random.PRNGKey(config.gamma.seed + 1), record, stats=stats,
                decoder=decoder_of(config), batch_size=config.gamma.batch_size, mean_type=mean_type)
            return dict(kl=c.kl, decoder=c.decoder, prior=np.float64(c.prior))

        arrays = cache.get(f"pair_costs_{record.name}", dict(fields, record=record.name, decoder=config.conventions.decoder),
                           compute)
        costs[record.name] = trajectories.PairCosts(arrays["kl"], arrays["decoder"], float(arrays["prior"]))
    return costs


def kept_for(record, spacing: str, num_steps: int, T: int, costs: dict) -> np.ndarray | None:
    """The steps of a (record, spacing, K) cell; None when the record has no trajectory of that spacing."""
    if spacing != OPTIMAL:
        return schedules.kept_steps(T, num_steps, spacing)
    if record.name not in costs:
        return None
    return trajectories.optimal_steps(costs[record.name].matrix, num_steps)


def sample_shape(config, example_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(the global batch B of one sampler call, this process's shape [b, ...]): b rows per process, a multiple of
    its device count, so that the processes together cover B (`hosts.rows_per_process`)."""
    batch = max(1, min(config.sample.batch_size, config.sample.num_samples))
    return batch, (hosts.rows_per_process(batch, jax.local_device_count()),) + tuple(example_shape)


def prepare_chain(schedule, record: variances.Variance, steps: np.ndarray, *, config: ml_collections.ConfigDict,
                  stats: dict[str, np.ndarray]):
    """(the K-step sub-chain `steps`, the σ choice resolved on it): `sampling.prepare_chain` with the config's
    decoder and σ-clipping conventions, as `sampling.sample` would resolve them."""
    c = config.conventions
    return sampling.prepare_chain(schedule, steps=steps, variance=record, stats=stats, decoder=decoder_of(config),
                                  sigma_clip_steps=c.sigma_clip_steps, sigma_clip_pixel=c.sigma_clip_pixel)


def sampler_structure(record: variances.Variance, steps: np.ndarray) -> tuple:
    """What a compiled sampler depends on besides the σ² values: the kept steps, σ² from the network or not (and
    which network function), ancestral or DDIM. fixed_large, fixed_small and analytic share one program per
    chain, as do the DDIM η rows: the ablation compiles once per (structure, chain), not once per σ choice."""
    return tuple(int(s) for s in steps), record.network, record.ddim_eta is not None


def compile_sampler(model_fn: Partial, sub: schedules.Schedule, resolved: variances.Resolved, shape: tuple[int, ...],
                    *, config: ml_collections.ConfigDict, mean_type: str):
    """(compiled f(model_fn, rng, first_example, σ², log σ²) -> samples [b, ...], seconds to compile): the chain of
    `sampling.sample` ahead of time, for this process's rows of a batch, with the σ choice's resolved σ², log σ²
    [K] as arguments (not constants), so that every choice of one `sampler_structure` runs this program.
    `sub`, `resolved`: from `prepare_chain`."""

    def run(model_fn, rng, first, sigma2, log_sigma2):
        fn = model_fn if resolved.record.from_network else statistics.mean_output_fn(model_fn)
        traced = dataclasses.replace(resolved, variance=sigma2, log_variance=log_sigma2)
        return sampling.run_chain(fn, sub, rng, shape, traced, mean_type=mean_type, clip_x0=config.sample.clip_x0,
                                  first_example=first)

    start = time.perf_counter()
    # first_example traced: sampling.run_chain converts it with jnp.asarray, which keeps a tracer.
    compiled = jax.jit(run).lower(model_fn, jax.random.PRNGKey(0), np.int32(0), resolved.variance,
                                  resolved.log_variance).compile()
    return compiled, time.perf_counter() - start


def draw_samples(compiled, model_fn: Partial, rng: Array, num_samples: int, batch: int, local_rows: int, bar=None):
    """(samples [num_samples, ...] as NumPy on every process, wall seconds): batch b from fold_in(rng, b), this
    process sampling its rows [p·local_rows, (p+1)·local_rows) of it, gathered; timed to completion."""
    first = np.int32(jax.process_index() * local_rows)
    batches, start = [], time.perf_counter()
    for b in range(math.ceil(num_samples / batch)):
        local = compiled(model_fn, jax.random.fold_in(rng, b), first)
        batches.append(hosts.gather_rows(np.asarray(local), batch))
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - start
    return np.concatenate(batches)[:num_samples], seconds


def bound_groups(records, kept_by_record: dict) -> dict[tuple, list]:
    """{kept steps: records with a bound on them}: records sharing the same steps share one pass (and x_t)."""
    groups: dict[tuple, list] = {}
    for record in records:
        kept = kept_by_record.get(record.name)
        if record.has_bound and kept is not None:
            groups.setdefault(tuple(kept.tolist()), []).append(record)
    return groups


def bound_totals(model_fn, schedule, groups: dict, test_images: np.ndarray, key: Array, config, mean_type, stats,
                 bar=None) -> dict[str, np.ndarray]:
    """{record name: per-image bound [N] in bits/dim} of the whole split, this process evaluating its batches.

    Batch b of the split draws from fold_in(key, b) and the last batch is padded with image 0, exactly as one
    `nll.nll_bpd_by_variance` call over the split, so the totals do not depend on the process count.
    """
    n = test_images.shape[0]
    batch = min(config.nll.batch_size, n)
    num_batches = math.ceil(n / batch)
    rows_of = lambda b: min(batch, n - b * batch)
    out = {}
    for steps, group in groups.items():
        parts = {r.name: [] for r in group}
        for b in hosts.batch_share(num_batches):
            rows = test_images[b * batch: b * batch + batch]
            padded = np.concatenate([rows, np.broadcast_to(test_images[:1], (batch - len(rows),) + rows.shape[1:])])
            result = nll.nll_bpd_by_variance(model_fn, schedule, padded, key, variances=group, steps=list(steps),
                                             stats=stats, decoder=decoder_of(config), batch_size=batch,
                                             mean_type=mean_type, clip_x0=config.nll.clip_x0, batch_offset=b,
                                             cdf=config.conventions.cdf)
            for name in parts:
                parts[name].append(result[name]["total"][: len(rows)])
            if bar is not None:
                bar.update(1)
        for name, values in parts.items():
            local = np.concatenate(values) if values else np.zeros(0)
            out[name] = hosts.gather_batches(local, num_batches, rows_of)
    return out


def paired_difference(total: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-image differences of two bounds on the same images and x_t draws."""
    diff = np.asarray(total, np.float64) - np.asarray(reference, np.float64)
    return float(diff.mean()), nll.standard_error(diff)


def bound_fields(total: np.ndarray, reference: np.ndarray | None) -> dict:
    """A record's bound columns from its per-image totals (and the reference record's, same images and x_t)."""
    fields = dict(nll_bpd=float(total.mean()), nll_stderr=nll.standard_error(total), nll_examples=int(total.size))
    if reference is not None:
        fields["nll_diff"], fields["nll_diff_se"] = paired_difference(total, reference)
    return fields
