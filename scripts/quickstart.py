r"""The quickstart: train the small digits model, run the σ_t ablation at reduced size, and check the result
against the committed reference table. Nothing is downloaded.

  python scripts/quickstart.py [--workdir=runs/quickstart] [--results=runs/quickstart/sigma_ablation] \
      [--train_steps=N] [--reference=results/sigma_ablation/results.csv]

1. Trains experiments/configs/digits.py (sklearn's 8×8 digits, shipped with
   scikit-learn) for --train_steps steps (default: the config's
   training.num_train_steps) into --workdir. An interrupted run
   resumes from its newest checkpoint; a finished one is not trained again.
2. Runs the σ_t ablation on its EMA weights, exactly as
     python -m experiments.sigma_ablation --config=experiments/configs/ablation_quickstart.py \
         --workdir=WORKDIR --config.output_dir=RESULTS
3. Writes RESULTS/quickstart.json (the wall time of each part, the final training loss and
   the verdict) and RESULTS/train_config.json, then compares RESULTS/results.csv with the
   committed reference: "reproduced" with the largest relative difference, or the rows that differ.
Both default directories lie under runs/, which git ignores: the committed results/ are left
untouched (pass --results=results/sigma_ablation to refresh them on purpose).
"""

from __future__ import annotations

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
from ddpm_jax import from_config, train  # noqa: E402
from ddpm_jax.utils import runtime  # noqa: E402
from experiments.sigma_ablation import report  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Training run directory (checkpoints, logs).")
_RESULTS = flags.DEFINE_string("results", None, "Where the ablation's table, plots and grids go "
                               "(default: WORKDIR/sigma_ablation).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None, "Training steps (default: the digits config's).")
_REFERENCE = flags.DEFINE_string("reference", "results/sigma_ablation/results.csv",
                                 "The committed table the run is compared with ('' to skip).")
_RTOL = flags.DEFINE_float("rtol", 1e-3, "Largest relative difference of a reproduced number.")

def digits_config(train_steps: int | None):
    config = from_config.load_config_file("digits.py")
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
    runtime.enable_compilation_cache()  # a rerun loads its compiled programs instead of compiling again
    if _TRAIN_STEPS.value is not None and _TRAIN_STEPS.value < 1:
        raise ValueError(f"--train_steps must be None or >= 1, got {_TRAIN_STEPS.value}")
    config = digits_config(_TRAIN_STEPS.value)
    train_steps = config.training.num_train_steps
    workdir = _WORKDIR.value
    results = _RESULTS.value or os.path.join(workdir, "sigma_ablation")
    start = time.perf_counter()
    logging.info("1/3 Training the digits model for %d steps in %s", train_steps, workdir)
    train.train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - start

    logging.info("2/3 The σ_t ablation -> %s", results)
    command = [sys.executable, "-m", "experiments.sigma_ablation",
               f"--config={os.path.join('experiments', 'configs', 'ablation_quickstart.py')}",
               f"--workdir={os.path.relpath(workdir, ROOT)}", f"--config.output_dir={os.path.relpath(results, ROOT)}"]
    subprocess.run(command, check=True, cwd=ROOT)
    ablation_s = time.perf_counter() - start - train_s

    summary = dict(train_steps=train_steps, train_wall_s=round(train_s, 1), ablation_wall_s=round(ablation_s, 1),
                   total_wall_s=round(train_s + ablation_s, 1), final_train_loss=final_loss(workdir),
                   cpu_count=os.cpu_count(), command=" ".join(["scripts/quickstart.py", *sys.argv[1:]]))
    reference = _REFERENCE.value and str(ROOT / _REFERENCE.value)
    if reference and os.path.abspath(reference) != os.path.abspath(os.path.join(results, "results.csv")):
        reproduced, largest, problems = report.compare_tables(os.path.join(results, "results.csv"), reference, _RTOL.value)
        summary.update(reference=_REFERENCE.value, reproduced=reproduced, largest_relative_difference=largest,
                       differences=problems)
    with open(os.path.join(results, "quickstart.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    shutil.copy(os.path.join(workdir, "config.json"), os.path.join(results, "train_config.json"))
    print(f"Quickstart done in {summary['total_wall_s'] / 60:.1f} min (training {train_s / 60:.1f}, "
          f"ablation {ablation_s / 60:.1f}). Table: {os.path.join(results, 'results.md')}")
    if "reproduced" in summary:
        if summary["reproduced"]:
            print(f"reproduced: every number of {_REFERENCE.value} within {_RTOL.value:g} "
                  f"(largest relative difference {summary['largest_relative_difference']:.2g})")
        else:
            print(f"NOT reproduced: {len(summary['differences'])} differences from {_REFERENCE.value}:")
            print("\n".join("  " + line for line in summary["differences"]))


if __name__ == "__main__":
    app.run(main)
