r"""The σ_t ablation of a trained model: NLL bound, sample quality and sampling time for every σ choice × K.

  python -m experiments.sigma_ablation --config=experiments/configs/ablation_quickstart.py \
      --workdir=RUN_DIR [--config.output_dir=results]

RUN_DIR is a training run's workdir (its newest checkpoint's EMA weights are
used). Writes to config.output_dir (default RUN_DIR/sigma_ablation):
  results.csv, results.md   one row per (σ choice, K): mean ± std over seeds
  per_seed.csv              one row per (σ choice, K, seed)
  nll_vs_k.png, quality_vs_k.png   one line per σ choice, log K axis, error bars = std over seeds
  grids/<setting>_K<K>.png  samples of the first seed; grids/data_<split>.png the reference images
  run_info.json             checkpoint, machine, date, wall time, the ablation config, what the cache gave
  run_config.json, cells/   the run's identity and its finished cells (cells.py)
Resumable: SIGTERM (or Ctrl-C) finishes the current cell and exits 0, SIGKILL loses it; rerunning
the same command skips the finished cells and writes the tables of an uninterrupted run. A changed
config is refused with the changed fields named; --new_output_dir starts <output_dir>_<n> instead.
Γ_t and the pair costs are kept in config.cache_dir (default RUN_DIR/sigma_ablation/cache) and
reused by every later run on the same checkpoint.
--multihost: every host runs the same command (jax.distributed); samples and bound batches are split
over all processes, and process 0 writes.
--report_only rewrites the tables and plots from per_seed.csv and run_info.json (e.g. after a
change of formatting) without loading the model; the grids are kept.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import checkpoints, data, from_config, pretrained
from ddpm_jax.evaluation import inception, quality
from ddpm_jax.models import count_params
from ddpm_jax.utils import runtime
from ddpm_jax.utils.signals import StopRequest

from experiments.sigma_ablation import cells, hosts, report, runner, settings, store

_CONFIG = config_flags.DEFINE_config_file("config", None, "Ablation config file (experiments/configs/ablation_*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run whose checkpoint is evaluated.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite results.csv/.md and the plots from the "
                                  "per_seed.csv and run_info.json already in the output directory.")
_NEW_OUTPUT_DIR = flags.DEFINE_bool("new_output_dir", False, "When the output directory holds a run of another "
                                    "config or checkpoint, write to <output_dir>_<n> instead of refusing.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "A released diffusers DDPM (directory or hub id): converted "
                                  "into --workdir as checkpoint step 0 first, unless it has checkpoints already.")
_PRETRAINED_DATASET = flags.DEFINE_string("pretrained_dataset", None, "The data set of --pretrained (default: "
                                          "from its name).")
_MULTIHOST = flags.DEFINE_bool("multihost", os.environ.get("DDPM_JAX_MULTIHOST", "0") == "1",
                               "Call jax.distributed.initialize() (one process per host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --multihost: host:port of process 0 "
                                   "(default: auto-detected on TPU VMs, SLURM, Open MPI, K8s).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --multihost: process count (default: auto).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --multihost: this process's index (default: auto).")
flags.mark_flags_as_required(["config", "workdir"])


def build_quality_fn(config, dataset: str, reference: np.ndarray, cache: store.Cache):
    """(score(samples, seed) -> {metric: value} or None, the kind name) for config.quality.

    The reference side (the digits classifier and the reference features, or the Inception features of the
    reference images) is computed once and kept in the cache, like Γ_t.
    """
    weights = config.quality.inception_weights or os.environ.get(inception.WEIGHTS_ENV_VAR)
    kind = quality.resolve_quality_kind(config.quality.kind, dataset, weights) if config.sample.num_samples else "none"
    logging.info("Sample quality: %s", kind)
    fields = dict(dataset=dataset, reference_split=config.quality.reference_split, num_reference=len(reference))
    if kind == "digits":
        def compute():
            source = data.open_source(dataset, "train")
            labels = np.array([source[i]["label"] for i in range(len(source))], np.int32)
            return quality.digits_reference(data.load_split_array(dataset, "train"), labels, reference,
                                            seed=config.quality.classifier_seed,
                                            classifier_steps=config.quality.classifier_steps)

        arrays = cache.get("digits_reference", dict(fields, classifier_seed=config.quality.classifier_seed,
                                                    classifier_steps=config.quality.classifier_steps), compute)
        return quality.digits_quality_fn_from(arrays, kid_subsets=config.quality.kid_subsets), kind
    if kind == "inception":
        arrays = cache.get("inception_reference", dict(fields, weights=os.path.basename(weights)),
                           lambda: quality.inception_reference(reference, weights=weights))
        return quality.inception_quality_fn(reference, weights=weights, kid_subsets=config.quality.kid_subsets,
                                            reference=arrays), kind
    return None, kind


def main(argv):
    del argv
    start = time.perf_counter()
    runtime.enable_compilation_cache()  # before the first jit: a resumed run loads the compiled programs
    config, workdir = _CONFIG.value, _WORKDIR.value
    if _REPORT_ONLY.value:
        out_dir = config.output_dir or os.path.join(workdir, "sigma_ablation")
        with open(os.path.join(out_dir, "run_info.json"), encoding="utf-8") as f:
            info = json.load(f)
        report.write_report(out_dir, report.read_records(os.path.join(out_dir, "per_seed.csv")), {}, info, None)
        return
    if _MULTIHOST.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    logging.info("JAX %s: process %d of %d, %d local devices", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_device_count())
    settings.validate_config(config)
    if _PRETRAINED.value is not None:
        if jax.process_count() > 1:
            raise app.UsageError("--pretrained converts in one process: run it once without --multihost first")
        pretrained.convert_into_workdir(_PRETRAINED.value, workdir, dataset=_PRETRAINED_DATASET.value)
    model_fn, schedule, train_config, step = runner.load_model(workdir, config.checkpoint_step)
    settings.validate_config(config, schedule.num_timesteps)
    checkpoint = dict(step=step, crc32=checkpoints.checksum(model_fn.args[0]))
    writer = hosts.is_writer()
    out_dir = store.open_output_dir(config.output_dir or os.path.join(workdir, "sigma_ablation"),
                                    store.identity(config, checkpoint), new_output_dir=_NEW_OUTPUT_DIR.value,
                                    writer=writer)
    cache = store.Cache(config.cache_dir or os.path.join(workdir, "sigma_ablation", "cache"), checkpoint,
                        writer=writer)

    dataset, image_size = train_config.data.dataset, train_config.data.image_size
    test_images = data.load_split_array(dataset, config.nll.split, image_size=image_size,
                                        max_examples=config.nll.num_examples)
    train_images = data.load_split_array(dataset, "train", image_size=image_size,
                                         max_examples=config.gamma.num_examples)
    reference = data.load_split_array(dataset, config.quality.reference_split, image_size=image_size)
    quality_fn, kind = build_quality_fn(config, dataset, reference, cache)

    with StopRequest() as stop:
        result = cells.run_ablation(
            model_fn, schedule, config, trained=from_config.variance_record(train_config),
            mean_type=train_config.diffusion.mean_type, train_images=train_images, test_images=test_images,
            quality_fn=quality_fn, out_dir=out_dir, cache=cache, stop=stop)
    if result is None or not writer:
        return  # stopped by a signal (exit 0: rerun to finish), or not the process that writes
    records, grids = result
    info = dict(workdir=report.portable_path(workdir), checkpoint_step=step, dataset=dataset, num_timesteps=schedule.num_timesteps,
                num_params=count_params(model_fn.args[0]), trained_variance=train_config.diffusion.variance,
                seeds=list(config.seeds), num_samples=config.sample.num_samples, nll_examples=len(test_images),
                nll_split=config.nll.split, quality=kind, quality_reference=config.quality.reference_split,
                machine=report.machine(), num_processes=jax.process_count(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                git_commit=checkpoints.code_version(), wall_time_s=time.perf_counter() - start,
                cache=[dict(kind=k, outcome=o, seconds=s) for k, o, s in cache.events],
                config=dict(config.to_dict(), output_dir=report.portable_path(out_dir)))
    rows = report.write_report(out_dir, records, grids, info, reference)
    logging.info("Wrote %d rows to %s in %.1f min (this invocation)", len(rows), out_dir, info["wall_time_s"] / 60)
    print(report.markdown_table(rows, settings.reference_of(config)))


if __name__ == "__main__":
    app.run(main)
