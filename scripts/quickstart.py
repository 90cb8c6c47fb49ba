r"""The quickstart: train the small digits model, then run the σ_t ablation at reduced size. Nothing is downloaded.

  python scripts/quickstart.py [--workdir=workdir_quickstart] [--results=results/sigma_ablation] \
      [--train_steps=N]

1. Trains experiments/configs/digits.py (sklearn's 8×8 digits, shipped with
   scikit-learn) for --train_steps steps (default: the config's
   training.num_train_steps) into --workdir. An interrupted run
   resumes from its newest checkpoint; a finished one is not trained again.
2. Runs the σ_t ablation on its EMA weights, exactly as
     python experiments/sigma_ablation.py --config=experiments/configs/ablation_quickstart.py \
         --workdir=WORKDIR --config.output_dir=RESULTS
3. Writes RESULTS/quickstart.json (the wall time of each part and the final training
   loss) and RESULTS/train_config.json (the training config and code version of the run).
The table is RESULTS/results.md; plots and sample grids lie beside it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from ddpm_jax import train  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdir_quickstart", "Training run directory (checkpoints, logs).")
_RESULTS = flags.DEFINE_string("results", "results/sigma_ablation", "Where the ablation's table, plots and grids go.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None, "Training steps (default: the digits config's).")


def digits_config(train_steps: int | None):
    spec = importlib.util.spec_from_file_location("digits_config", ROOT / "experiments" / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if train_steps is not None:
        config.training.num_train_steps = train_steps
    config.training.save_every = min(config.training.save_every, config.training.num_train_steps)
    config.training.sample_every = 0  # the ablation draws the sample grids
    return config


def final_loss(workdir: str) -> float | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if '"loss"' in line]
    return lines[-1]["loss"] if lines else None


def main(argv):
    del argv
    if _TRAIN_STEPS.value is not None and _TRAIN_STEPS.value < 1:
        raise ValueError(f"--train_steps must be None or >= 1, got {_TRAIN_STEPS.value}")
    config = digits_config(_TRAIN_STEPS.value)
    train_steps = config.training.num_train_steps
    workdir, results = os.path.abspath(_WORKDIR.value), os.path.abspath(_RESULTS.value)
    start = time.perf_counter()
    logging.info("1/2 Training the digits model for %d steps in %s", train_steps, workdir)
    train.train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - start

    logging.info("2/2 The σ_t ablation -> %s", results)
    command = [sys.executable, str(ROOT / "experiments" / "sigma_ablation.py"),
               f"--config={ROOT / 'experiments' / 'configs' / 'ablation_quickstart.py'}", f"--workdir={workdir}",
               f"--config.output_dir={results}"]
    subprocess.run(command, check=True, cwd=ROOT)
    ablation_s = time.perf_counter() - start - train_s

    summary = dict(train_steps=train_steps, train_wall_s=round(train_s, 1),
                   ablation_wall_s=round(ablation_s, 1), total_wall_s=round(train_s + ablation_s, 1),
                   final_train_loss=final_loss(workdir), cpu_count=os.cpu_count(), command=" ".join(sys.argv))
    with open(os.path.join(results, "quickstart.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    shutil.copy(os.path.join(workdir, "config.json"), os.path.join(results, "train_config.json"))
    print(f"Quickstart done in {summary['total_wall_s'] / 60:.1f} min (training {train_s / 60:.1f}, "
          f"ablation {ablation_s / 60:.1f}). Table: {os.path.join(results, 'results.md')}")


if __name__ == "__main__":
    app.run(main)
