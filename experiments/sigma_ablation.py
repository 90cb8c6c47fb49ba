r"""The σ_t ablation of a trained model: NLL bound, sample quality and sampling time for every σ choice × K.

  python experiments/sigma_ablation.py --config=experiments/configs/ablation_quickstart.py \
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
import math
import os
import platform
import sys
import time

import jax
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from ddpm_jax import checkpoints, data  # noqa: E402
from ddpm_jax.evaluation import ablation, inception  # noqa: E402
from ddpm_jax.models import count_params  # noqa: E402
from ddpm_jax.utils import images  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Ablation config file (experiments/configs/ablation_*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run whose checkpoint is evaluated.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite results.csv/.md and the plots from the "
                                  "per_seed.csv and run_info.json already in the output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def plot_vs_k(rows: list[dict], metrics: list[str], path: str, *, log_y: bool = False) -> None:
    """One panel per metric: mean vs K with std error bars, one line per σ choice, log x axis."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    ks = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for setting in settings:
            sel = [r for r in rows if r["setting"] == setting and math.isfinite(r.get(f"{metric}_mean", math.nan))]
            if not sel:
                continue
            std = [0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"] for r in sel]
            ax.errorbar([r["K"] for r in sel], [r[f"{metric}_mean"] for r in sel], yerr=std, marker="o",
                        capsize=3, label=setting, linestyle="--" if setting.startswith("ddim") else "-")
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("K (sampling steps)")
        ax.set_ylabel(ablation.LABELS[metric])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> dict:
    device = jax.devices()[0]
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": device.device_kind, "num_devices": jax.device_count()}


def write_report(out_dir: str, records: list[dict], grids: dict, info: dict,
                 reference: np.ndarray | None) -> list[dict]:
    rows = ablation.aggregate(records)
    ablation.write_csv(rows, os.path.join(out_dir, "results.csv"))
    ablation.write_csv(records, os.path.join(out_dir, "per_seed.csv"))
    quality = [m for m in ("fdd", "fid", "kid") if any(f"{m}_mean" in r for r in rows)]
    if any("nll_bpd_mean" in r for r in rows):
        plot_vs_k(rows, ["nll_bpd"], os.path.join(out_dir, "nll_vs_k.png"), log_y=True)
    if quality:
        plot_vs_k(rows, quality, os.path.join(out_dir, "quality_vs_k.png"))
    if grids:
        os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
        grids = {**grids, ("data", info["quality_reference"]): reference[: len(next(iter(grids.values())))]}
    for (setting, k), samples in grids.items():
        if samples.ndim == 4:  # image data; 2-D toy points have no grid
            images.save_grid(os.path.join(out_dir, "grids", f"{setting}_K{k}.png" if setting != "data"
                                          else f"data_{k}.png"), samples, scale=max(1, 64 // samples.shape[1]))
    header = (f"# σ_t ablation\n\n{info['dataset']}, checkpoint step {info['checkpoint_step']} of "
              f"`{info['workdir']}` ({info['num_params']:,} parameters, T = {info['num_timesteps']}, "
              f"trained with variance={info['trained_variance']}); seeds {info['seeds']}, "
              f"{info['num_samples'] or 'no'} samples per setting and seed, bound on {info['nll_examples']} "
              f"{info['nll_split']} images. Mean ± std over seeds; sampling time excludes compilation. "
              f"{info['date']}, {info['machine']['device']} ({info['machine']['cpu_count']} CPUs), "
              f"total wall time {info['wall_time_s'] / 60:.1f} min, code {info['git_commit']}.\n\n")
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(header + ablation.markdown_table(rows))
    with open(os.path.join(out_dir, "run_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)
    return rows


def main(argv):
    del argv
    start = time.perf_counter()
    config, workdir = _CONFIG.value, _WORKDIR.value
    if _REPORT_ONLY.value:
        out_dir = config.output_dir or os.path.join(workdir, "sigma_ablation")
        with open(os.path.join(out_dir, "run_info.json"), encoding="utf-8") as f:
            info = json.load(f)
        write_report(out_dir, ablation.read_records(os.path.join(out_dir, "per_seed.csv")), {}, info, None)
        return
    ablation.validate_config(config)
    model_fn, schedule, train_config, step = ablation.load_model(workdir, config.checkpoint_step)
    ablation.validate_config(config, schedule.num_timesteps)
    out_dir = config.output_dir or os.path.join(workdir, "sigma_ablation")
    os.makedirs(out_dir, exist_ok=True)

    dataset, image_size = train_config.data.dataset, train_config.data.image_size
    test_images = data.load_split_array(dataset, config.nll.split, image_size=image_size,
                                        max_examples=config.nll.num_examples)
    train_images = data.load_split_array(dataset, "train", image_size=image_size,
                                         max_examples=config.gamma.num_examples)
    reference = data.load_split_array(dataset, config.quality.reference_split, image_size=image_size)
    weights = config.quality.inception_weights or os.environ.get(inception.WEIGHTS_ENV_VAR)
    kind = ablation.resolve_quality_kind(config.quality.kind, dataset, weights) if config.sample.num_samples else "none"
    logging.info("Sample quality: %s", kind)
    if kind == "digits":
        source = data.open_source(dataset, "train")
        labels = np.array([source[i]["label"] for i in range(len(source))], np.int32)
        quality_fn = ablation.digits_quality_fn(data.load_split_array(dataset, "train"), labels, reference,
                                                seed=config.quality.classifier_seed,
                                                classifier_steps=config.quality.classifier_steps,
                                                kid_subsets=config.quality.kid_subsets)
    elif kind == "inception":
        quality_fn = ablation.inception_quality_fn(reference, weights=weights, kid_subsets=config.quality.kid_subsets)
    else:
        quality_fn = None

    records, grids = ablation.run_ablation(
        model_fn, schedule, config, trained_variance=train_config.diffusion.variance,
        mean_type=train_config.diffusion.mean_type, train_images=train_images, test_images=test_images,
        quality_fn=quality_fn)
    info = dict(workdir=workdir, checkpoint_step=step, dataset=dataset, num_timesteps=schedule.num_timesteps,
                num_params=count_params(model_fn.args[0]), trained_variance=train_config.diffusion.variance,
                seeds=list(config.seeds), num_samples=config.sample.num_samples, nll_examples=len(test_images),
                nll_split=config.nll.split, quality=kind, quality_reference=config.quality.reference_split,
                machine=machine(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                git_commit=checkpoints.code_version(), wall_time_s=time.perf_counter() - start,
                config=config.to_dict())
    rows = write_report(out_dir, records, grids, info, reference)
    logging.info("Wrote %d rows to %s in %.1f min", len(rows), out_dir, info["wall_time_s"] / 60)
    print(ablation.markdown_table(rows))


if __name__ == "__main__":
    app.run(main)
