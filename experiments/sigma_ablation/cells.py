"""The ablation as resumable cells: each finished unit of work is one file, written whole or not at all.

Under <out_dir>/cells/ (`store.atomic_write`):
  bound_<spacing>_K<K>_seed<s>.npz   the per-image bound [N] of every σ choice that has one at (spacing, K, seed),
                                     from one shared pass (same x_t draws): the rows and the paired
                                     differences are rebuilt from it
  sample_<σ>_<spacing>_K<K>_seed<s>.json   sample count, sampling and compile time, sample quality (the
                                     compile time of the program the cell ran, which the σ choices of one
                                     `runner.sampler_structure` share)
  grid_<σ>_<spacing>_K<K>.npz        the first seed's grid, written before that seed's sample cell
A rerun skips every cell whose file exists (process 0's view decides, `hosts.agree`) and the
records are always rebuilt from the files in the plan's order, so a run stopped (SIGTERM: the
current cell is finished first, exit 0) or killed (the current cell is lost) and rerun writes the
tables of an uninterrupted run. Timing fields naturally differ between runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.tree_util import Partial
from tqdm.auto import tqdm

from ddpm_jax import variances
from ddpm_jax.utils.signals import StopRequest

from experiments.sigma_ablation import hosts, runner, settings, store


@dataclasses.dataclass(frozen=True)
class Cell:
    kind: str  # 'bound' (every σ choice at once) or 'sample' (one σ choice)
    spacing: str
    K: int
    seed: int
    setting: str | None = None

    @property
    def file(self) -> str:
        if self.kind == "bound":
            return f"bound_{self.spacing}_K{self.K}_seed{self.seed}.npz"
        return f"sample_{self.setting}_{self.spacing}_K{self.K}_seed{self.seed}.json"

    def __str__(self) -> str:
        who = "bound" if self.kind == "bound" else self.setting
        return f"{who} {self.spacing} K={self.K} seed={self.seed}"


def grid_file(setting: str, spacing: str, num_steps: int) -> str:
    return f"grid_{setting}_{spacing}_K{num_steps}.npz"


@dataclasses.dataclass
class Plan:
    """The σ choices, their kept steps per (spacing, K) (None: no trajectory of that spacing) and the cells."""

    choices: list[variances.Variance]
    kept: dict[tuple[str, str, int], np.ndarray | None]
    cells: list[Cell]

    def kept_by_record(self, spacing: str, num_steps: int) -> dict:
        return {r.name: self.kept[(r.name, spacing, num_steps)] for r in self.choices}


def make_plan(choices, config: ml_collections.ConfigDict, T: int, costs: dict) -> Plan:
    kept = {(r.name, s, k): runner.kept_for(r, s, k, T, costs) for s in config.spacings for k in config.num_steps
            for r in choices}
    cells = []
    for spacing in config.spacings:
        for num_steps in config.num_steps:
            with_steps = [r for r in choices if kept[(r.name, spacing, num_steps)] is not None]
            for seed in config.seeds:
                if any(r.has_bound for r in with_steps):
                    cells.append(Cell("bound", spacing, num_steps, seed))
                if config.sample.num_samples > 0:
                    cells += [Cell("sample", spacing, num_steps, seed, r.name) for r in with_steps]
    return Plan(choices, kept, cells)


@dataclasses.dataclass
class Job:
    """Everything a cell reads: the model, the data, the statistics."""

    model_fn: Partial
    schedule: object
    config: ml_collections.ConfigDict
    mean_type: str
    test_images: np.ndarray
    stats: dict
    quality_fn: Callable[[np.ndarray, int], dict[str, float]] | None
    cells_dir: str
    compiled: dict = dataclasses.field(default_factory=dict)


def _record(plan: Plan, name: str) -> variances.Variance:
    return next(r for r in plan.choices if r.name == name)


def _run_sample_cell(job: Job, plan: Plan, cell: Cell, bar) -> dict:
    config = job.config
    record, kept = _record(plan, cell.setting), plan.kept[(cell.setting, cell.spacing, cell.K)]
    batch, shape = runner.sample_shape(config, job.test_images.shape[1:])
    bar.reset(total=math.ceil(config.sample.num_samples / batch))
    sub, resolved = runner.prepare_chain(job.schedule, record, kept, config=config, stats=job.stats)
    structure = runner.sampler_structure(record, kept)
    if structure not in job.compiled:
        job.compiled[structure] = runner.compile_sampler(job.model_fn, sub, resolved, shape, config=config,
                                                         mean_type=job.mean_type)
    compiled, compile_s = job.compiled[structure]
    fn = lambda model_fn, rng, first: compiled(model_fn, rng, first, resolved.variance, resolved.log_variance)
    samples, sample_s = runner.draw_samples(fn, job.model_fn, jax.random.fold_in(jax.random.PRNGKey(cell.seed), 0),
                                            config.sample.num_samples, batch, shape[0], bar)
    fields = dict(num_samples=len(samples), sample_time_s=sample_s, compile_time_s=compile_s)
    if hosts.is_writer():
        if job.quality_fn is not None:
            fields.update({k: float(v) for k, v in job.quality_fn(samples, cell.seed).items()})
        if cell.seed == config.seeds[0]:
            store.write_npz(os.path.join(job.cells_dir, grid_file(cell.setting, cell.spacing, cell.K)),
                            {"samples": samples[: config.grid_size]})
        store.write_json(os.path.join(job.cells_dir, cell.file), fields)
    return fields


def _run_bound_cell(job: Job, plan: Plan, cell: Cell, bar) -> dict:
    groups = runner.bound_groups(plan.choices, plan.kept_by_record(cell.spacing, cell.K))
    n = job.test_images.shape[0]
    num_batches = math.ceil(n / min(job.config.nll.batch_size, n))
    bar.reset(total=len(groups) * len(hosts.batch_share(num_batches)))
    key = jax.random.fold_in(jax.random.PRNGKey(cell.seed), 1)
    totals = runner.bound_totals(job.model_fn, job.schedule, groups, job.test_images, key, job.config,
                                 job.mean_type, job.stats, bar)
    if hosts.is_writer():
        store.write_npz(os.path.join(job.cells_dir, cell.file), totals)
    return {name: float(total.mean()) for name, total in totals.items()}


def run_cells(job: Job, plan: Plan, stop: StopRequest) -> bool:
    """Runs every unfinished cell of the plan; False when a signal stopped it (after finishing the current cell)."""
    done = hosts.agree([os.path.exists(os.path.join(job.cells_dir, c.file)) for c in plan.cells])
    todo = [c for c, d in zip(plan.cells, done) if not d]
    logging.info("%d cells, %d already done, %d to run", len(plan.cells), len(plan.cells) - len(todo), len(todo))
    quiet = not hosts.is_writer()
    with tqdm(total=len(plan.cells), initial=len(plan.cells) - len(todo), desc="cells", unit="cell", position=0,
              disable=quiet) as cells_bar, tqdm(total=1, desc="cell", unit="batch", position=1, leave=False,
                                                disable=quiet) as work_bar:
        for index, cell in enumerate(todo):
            if stop.requested():
                logging.warning("Signal %s: stopping after %d of %d cells; rerun the same command to finish.",
                                stop.signum, len(plan.cells) - len(todo) + index, len(plan.cells))
                return False
            start = time.perf_counter()
            work_bar.set_description(str(cell))
            run = _run_bound_cell if cell.kind == "bound" else _run_sample_cell
            values = run(job, plan, cell, work_bar)
            cells_bar.update(1)
            logging.info("cell %d/%d %s done in %.1f s: %s", cells_bar.n, len(plan.cells), cell,
                         time.perf_counter() - start,
                         {k: round(v, 4) for k, v in values.items() if isinstance(v, float)})
    return True


def records_from_files(plan: Plan, config: ml_collections.ConfigDict, cells_dir: str) -> tuple[list[dict], dict]:
    """(records, grids) rebuilt from the cell files, in the plan's order: one record per (σ choice, spacing, K, seed)."""
    records, grids = [], {}
    for spacing in config.spacings:
        for num_steps in config.num_steps:
            for seed in config.seeds:
                path = os.path.join(cells_dir, Cell("bound", spacing, num_steps, seed).file)
                bounds = store.read_npz(path) if os.path.exists(path) else {}
                reference = bounds.get(settings.reference_of(config))
                for record in plan.choices:
                    kept = plan.kept[(record.name, spacing, num_steps)]
                    if kept is None:
                        continue
                    row = dict(setting=record.name, eta=record.ddim_eta, spacing=spacing, K=num_steps, seed=seed,
                               decoder=config.conventions.decoder, note=record.bound_note)
                    if spacing == runner.OPTIMAL:
                        row["steps"] = " ".join(map(str, kept.tolist()))
                    if config.sample.num_samples > 0:
                        cell = Cell("sample", spacing, num_steps, seed, record.name)
                        row.update(store.read_json(os.path.join(cells_dir, cell.file)))
                        if seed == config.seeds[0]:
                            grid = store.read_npz(os.path.join(cells_dir, grid_file(record.name, spacing, num_steps)))
                            grids[(record.name, spacing, num_steps)] = grid["samples"]
                    if record.name in bounds:
                        row.update(runner.bound_fields(bounds[record.name], reference))
                    records.append(row)
    return records, grids


def run_ablation(model_fn: Partial, schedule, config: ml_collections.ConfigDict, *, trained: variances.Variance,
                 mean_type: str, train_images: np.ndarray, test_images: np.ndarray,
                 quality_fn: Callable[[np.ndarray, int], dict[str, float]] | None, out_dir: str,
                 cache: store.Cache, stop: StopRequest):
    """Every (σ choice, spacing, K, seed) of `config` -> (records [dict], grids {(setting, spacing, K): samples}),
    or None when a signal stopped the run (its finished cells are kept in out_dir/cells).

    config.sample.num_samples = 0 computes the bounds alone (no sampling, quality or timing).
    schedule: the full T-step chain of the model. train_images feed the statistics (Analytic-DPM
    estimates Γ_t on training data) and the pair costs of optimal trajectories; test_images
    [N, ...] on the 8-bit grid are the split the bound is averaged over. Each row also holds its
    bound's paired difference to config.reference's (same images, same x_t draws). Processes
    other than 0 return ([], {}): only process 0 reads the cells back.
    """
    choices = settings.sigma_choices(config, trained)
    stats = runner.estimate_statistics(choices, model_fn, schedule, config, train_images, mean_type, cache)
    costs = runner.trajectory_costs(choices, model_fn, schedule, config, train_images, mean_type, stats, cache)
    plan = make_plan(choices, config, schedule.num_timesteps, costs)
    cells_dir = os.path.join(out_dir, store.CELLS_DIR)
    job = Job(model_fn, schedule, config, mean_type, test_images, stats, quality_fn, cells_dir)
    if not run_cells(job, plan, stop):
        return None
    if not hosts.is_writer():
        return [], {}
    return records_from_files(plan, config, cells_dir)
