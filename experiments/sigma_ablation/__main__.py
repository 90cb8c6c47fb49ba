r"""The σ_t ablation of a trained model: NLL bound, sample quality and sampling time for every σ choice × K.

  python -m experiments.sigma_ablation --config=experiments/configs/ablation_quickstart.py \
      --workdir=RUN_DIR [--config.output_dir=results]

RUN_DIR is a training run's workdir (its newest checkpoint's EMA weights are
used). Writes to config.output_dir (default RUN_DIR/sigma_ablation):
  results.csv, results.md   one row per (σ choice, K): mean ± std over seeds
  per_seed.csv              one row per (σ choice, K, seed)
  nll_vs_k.png, quality_vs_k.png   one line per σ choice, log K axis, error bars = std over seeds
  grids/<setting>_K<K>.png  samples of the first seed; grids/data_<split>.png the reference images
  run_info.json             checkpoint, machine, date, wall time, the ablation config
--report_only rewrites the tables and plots from per_seed.csv and run_info.json (e.g. after a
change of formatting) without loading the model; the grids are kept.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import checkpoints, data, from_config, pretrained
from ddpm_jax.evaluation import inception, quality
from ddpm_jax.models import count_params

from experiments.sigma_ablation import report, runner, settings

_CONFIG = config_flags.DEFINE_config_file("config", None, "Ablation config file (experiments/configs/ablation_*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run whose checkpoint is evaluated.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite results.csv/.md and the plots from the "
                                  "per_seed.csv and run_info.json already in the output directory.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "A released diffusers DDPM (directory or hub id): converted "
                                  "into --workdir as checkpoint step 0 first, unless it has checkpoints already.")
_PRETRAINED_DATASET = flags.DEFINE_string("pretrained_dataset", None, "The data set of --pretrained (default: "
                                          "from its name).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    start = time.perf_counter()
    config, workdir = _CONFIG.value, _WORKDIR.value
    if _REPORT_ONLY.value:
        out_dir = config.output_dir or os.path.join(workdir, "sigma_ablation")
        with open(os.path.join(out_dir, "run_info.json"), encoding="utf-8") as f:
            info = json.load(f)
        report.write_report(out_dir, report.read_records(os.path.join(out_dir, "per_seed.csv")), {}, info, None)
        return
    settings.validate_config(config)
    if _PRETRAINED.value is not None:
        pretrained.convert_into_workdir(_PRETRAINED.value, workdir, dataset=_PRETRAINED_DATASET.value)
    model_fn, schedule, train_config, step = runner.load_model(workdir, config.checkpoint_step)
    settings.validate_config(config, schedule.num_timesteps)
    out_dir = config.output_dir or os.path.join(workdir, "sigma_ablation")
    os.makedirs(out_dir, exist_ok=True)

    dataset, image_size = train_config.data.dataset, train_config.data.image_size
    test_images = data.load_split_array(dataset, config.nll.split, image_size=image_size,
                                        max_examples=config.nll.num_examples)
    train_images = data.load_split_array(dataset, "train", image_size=image_size,
                                         max_examples=config.gamma.num_examples)
    reference = data.load_split_array(dataset, config.quality.reference_split, image_size=image_size)
    weights = config.quality.inception_weights or os.environ.get(inception.WEIGHTS_ENV_VAR)
    kind = quality.resolve_quality_kind(config.quality.kind, dataset, weights) if config.sample.num_samples else "none"
    logging.info("Sample quality: %s", kind)
    if kind == "digits":
        source = data.open_source(dataset, "train")
        labels = np.array([source[i]["label"] for i in range(len(source))], np.int32)
        quality_fn = quality.digits_quality_fn(data.load_split_array(dataset, "train"), labels, reference,
                                                seed=config.quality.classifier_seed,
                                                classifier_steps=config.quality.classifier_steps,
                                                kid_subsets=config.quality.kid_subsets)
    elif kind == "inception":
        quality_fn = quality.inception_quality_fn(reference, weights=weights, kid_subsets=config.quality.kid_subsets)
    else:
        quality_fn = None

    records, grids = runner.run_ablation(
        model_fn, schedule, config, trained=from_config.variance_record(train_config),
        mean_type=train_config.diffusion.mean_type, train_images=train_images, test_images=test_images,
        quality_fn=quality_fn)
    info = dict(workdir=report.portable_path(workdir), checkpoint_step=step, dataset=dataset, num_timesteps=schedule.num_timesteps,
                num_params=count_params(model_fn.args[0]), trained_variance=train_config.diffusion.variance,
                seeds=list(config.seeds), num_samples=config.sample.num_samples, nll_examples=len(test_images),
                nll_split=config.nll.split, quality=kind, quality_reference=config.quality.reference_split,
                machine=report.machine(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                git_commit=checkpoints.code_version(), wall_time_s=time.perf_counter() - start,
                config=config.to_dict())
    rows = report.write_report(out_dir, records, grids, info, reference)
    logging.info("Wrote %d rows to %s in %.1f min", len(rows), out_dir, info["wall_time_s"] / 60)
    print(report.markdown_table(rows, config.reference))


if __name__ == "__main__":
    app.run(main)
