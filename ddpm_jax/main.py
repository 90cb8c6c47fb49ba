"""Command line: flags -> config -> train, sample or evaluate.

  python -m ddpm_jax.main --config=experiments/configs/digits.py --workdir=runs/digits [--mode=train]
  python -m ddpm_jax.main --workdir=runs/digits --mode=sample [--config=... --config.sampling.num_steps=100]
  python -m ddpm_jax.main --workdir=runs/digits --mode=eval [--step=6000]

Any field can be overridden: --config.training.batch_size=64. The installed
console script `ddpm-jax` is `run()`. With --multihost (or DDPM_JAX_MULTIHOST=1)
every host runs the same command and `jax.distributed.initialize()` finds its
peers (TPU VM metadata, SLURM or Open MPI environment variables).

sample and eval read the EMA weights of the newest intact checkpoint (or
--step). The model, diffusion and data groups come from the checkpoint's own
config; the sampling and eval groups from --config when it is given.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import checkpoints, config_validation, data, losses, schedules, train
from ddpm_jax.utils import images as image_grid

MODES = ("train", "sample", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for sample/eval (default: the newest intact one).")
_MULTIHOST = flags.DEFINE_bool("multihost", os.environ.get("DDPM_JAX_MULTIHOST", "0") == "1",
                               "Call jax.distributed.initialize() (one process per host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "With --multihost: host:port of process 0 (default: auto-detected on TPU VMs, "
                                   "SLURM, Open MPI, Kubernetes).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --multihost: process count (default: auto).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --multihost: this process's index (default: auto).")


def merged_config(trained: ml_collections.ConfigDict,
                  given: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The checkpoint's config with the sampling and eval groups of `given` (when given)."""
    config = ml_collections.ConfigDict(trained.to_dict())
    if given is not None:
        config.sampling = ml_collections.ConfigDict(given.sampling.to_dict())
        config.eval = ml_collections.ConfigDict(given.eval.to_dict())
    # The training-batch split is not used here: check only what sampling needs.
    config_validation.validate_config(config, process_count=1, local_device_count=1)
    return config


def sample(config: ml_collections.ConfigDict, params, step: int, workdir: str) -> str:
    """sampling.batch samples with the EMA weights -> workdir/samples/ema_<step>.{png,npz}; returns the png path.

    The key is the training loop's sample key, so the grid matches the one the
    loop wrote at this step when the sampling settings are the same.
    """
    _, _, sample_rng = jax.random.split(jax.random.PRNGKey(config.training.seed), 3)
    x0 = np.asarray(train.generate_samples(config, params, sample_rng, progress=True))
    out = os.path.join(workdir, "samples")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"ema_{step:08d}")
    image_grid.save_grid(stem + ".png", x0, scale=max(1, 64 // x0.shape[1]))
    np.savez(stem + ".npz", samples=x0, uint8=image_grid.to_uint8(x0), step=step, config=config.to_json())
    return stem + ".png"


def evaluate(config: ml_collections.ConfigDict, params, step: int, workdir: str) -> dict:
    """The variational bound L_vlb (Ho eq. 5) in bits/dim on eval.num_batches batches of eval.split.

    With eval.num_steps = K < T the bound is that of the K-step sub-chain
    (Nichol & Dhariwal §4), an upper bound on the full chain's NLL only in expectation.
    """
    e, d = config.eval, config.diffusion
    x = data.load_split_array(config.data.dataset, e.split, image_size=config.data.image_size,
                              data_dir=config.data.data_dir, max_examples=e.batch_size * e.num_batches)
    schedule = train.build_schedule(config)
    if e.num_steps is not None and e.num_steps < d.num_timesteps:
        schedule = schedules.respace(schedule, schedules.space_timesteps(d.num_timesteps, e.num_steps))
    model_fn = train.eval_model_fn(config, params, d.variance)

    @jax.jit
    def bound(model_fn, x0, rng):
        return losses.bpd_terms(model_fn, schedule, x0, rng, variance=d.variance, mean_type=d.mean_type)

    rng = jax.random.PRNGKey(config.training.seed)
    totals, priors = [], []
    for i, start in enumerate(range(0, len(x), e.batch_size)):
        terms = bound(model_fn, x[start:start + e.batch_size], jax.random.fold_in(rng, i))
        totals.append(np.asarray(terms["total"]))
        priors.append(np.asarray(terms["prior"]))
    totals, priors = np.concatenate(totals), np.concatenate(priors)
    result = {"step": step, "split": e.split, "num_examples": len(totals), "num_steps": schedule.num_timesteps,
              "bpd": float(totals.mean()), "bpd_stderr": float(totals.std(ddof=1) / np.sqrt(len(totals)))
              if len(totals) > 1 else float("nan"), "prior_bpd": float(priors.mean())}
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", f"nll_{step:08d}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    if _MULTIHOST.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    logging.info("JAX %s: process %d of %d, %d local devices (%s)", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.devices()[0].platform)
    if _MODE.value == "train":
        if _CONFIG.value is None:
            raise app.UsageError("--config is required for --mode=train")
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        return
    ema = checkpoints.load_ema_params(_WORKDIR.value, _STEP.value)
    config = merged_config(ema.config, _CONFIG.value)
    if _MODE.value == "sample":
        path = sample(config, ema.params, ema.step, _WORKDIR.value)
        print(f"samples of step {ema.step}: {path}")
    else:
        result = evaluate(config, ema.params, ema.step, _WORKDIR.value)
        print(json.dumps(result))


def run() -> None:
    """Console-script entry point (`ddpm-jax`)."""
    app.run(main)


if __name__ == "__main__":
    run()
