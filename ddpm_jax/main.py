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

import ast
import difflib
import json
import os
import re
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import checkpoints, config_validation, data, from_config, pretrained, resume, train
from ddpm_jax.evaluation import nll
from ddpm_jax.utils import images as image_grid
from ddpm_jax.utils import runtime

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
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "A released diffusers DDPM (a directory, or a hub id such as google/ddpm-cifar10-32): "
    "converted into --workdir as checkpoint step 0 when the workdir has no checkpoint yet, then used like a "
    "trained run's (sample, eval, the σ ablation, or training = fine-tuning).")
_PRETRAINED_DATASET = flags.DEFINE_string(
    "pretrained_dataset", None, "The data set of --pretrained (a data.DATASETS name); default: from its name.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                         "Train: resume even when fields that change the experiment differ from "
                                         "the config that trained the checkpoints (ddpm_jax/resume.py).")
_FRESH_START = flags.DEFINE_bool("fresh_start_if_damaged", False,
                                 "Train: when every checkpoint is damaged, move them to workdir/damaged_checkpoints "
                                 "and train from step 0 (default: stop with an error).")
# --config.diffusion.schedule_kwargs.NAME=VALUE: the schedule's keywords differ per schedule, so the default
# config declares none and config_flags cannot override them; they are taken out of argv and set after parsing.
_SCHEDULE_KWARG = re.compile(r"--?config\.diffusion\.schedule_kwargs\.(?P<name>\w+)(=(?P<value>.*))?")
_CONFIG_OVERRIDE = re.compile(r"--?(no)?config\.(?P<path>[^=]+)(=.*)?")


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
    config_validation.check_sampling_batch(config.sampling.batch, jax.local_device_count())
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
    One NLL path: `evaluation.nll.nll_bpd`, with the trained σ and its decoder convention.
    """
    e, d = config.eval, config.diffusion
    x = data.load_split_array(config.data.dataset, e.split, image_size=config.data.image_size,
                              data_dir=config.data.data_dir, max_examples=e.batch_size * e.num_batches)
    bound = nll.nll_bpd(from_config.model_fn(config, params), from_config.build_schedule(config), x,
                        jax.random.PRNGKey(config.training.seed), variance=d.variance, num_steps=e.num_steps,
                        batch_size=e.batch_size, mean_type=d.mean_type)
    return {"step": step, "split": e.split, "num_examples": bound["num_examples"], "num_steps": bound["num_steps"],
            "bpd": bound["mean"], "bpd_stderr": bound["stderr"], "prior_bpd": float(bound["prior"].mean())}


def write_eval_result(result: dict, workdir: str) -> None:
    """workdir/eval/nll_<step>.json; a write failure (a read-only workdir) is a warning, the result was printed."""
    path = os.path.join(workdir, "eval", f"nll_{result['step']:08d}.json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    except OSError as err:
        logging.warning("The bound was printed but could not be written to %s: %s", path, err)


def main(argv: list[str]) -> None:
    runtime.enable_compilation_cache()  # before the first jit: later starts load the compiled programs
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    if _MULTIHOST.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    logging.info("JAX %s: process %d of %d, %d local devices (%s)", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.devices()[0].platform)
    if _PRETRAINED.value is not None:
        if jax.process_count() > 1:
            raise app.UsageError("--pretrained converts in one process: run it once without --multihost first")
        pretrained.convert_into_workdir(_PRETRAINED.value, _WORKDIR.value, dataset=_PRETRAINED_DATASET.value)
    if _MODE.value == "train":
        if _CONFIG.value is None:
            raise app.UsageError("--config is required for --mode=train")
        try:
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                                     fresh_start_if_damaged=_FRESH_START.value)
        except (resume.ResumeRefused, checkpoints.AllCheckpointsDamaged) as err:
            raise SystemExit(f"ddpm_jax: training not started: {err}") from None  # the message says it all
        return
    ema = checkpoints.load_ema_params(_WORKDIR.value, _STEP.value)
    config = merged_config(ema.config, _CONFIG.value)
    if _MODE.value == "sample":
        path = sample(config, ema.params, ema.step, _WORKDIR.value)
        print(f"samples of step {ema.step}: {path}")
    else:
        result = evaluate(config, ema.params, ema.step, _WORKDIR.value)
        print(json.dumps(result), flush=True)  # before any file, so a read-only workdir loses nothing
        write_eval_result(result, _WORKDIR.value)


def _config_override_error(argv: list[str]) -> str | None:
    """One message naming every --config.<group>.<field> of argv that is not a config field, with the nearest
    valid names; None when all exist."""
    valid = [f"{group}.{name}" for group, names in config_validation.FIELDS.items() for name in names]
    lines = []
    for arg in argv[1:]:
        match = _CONFIG_OVERRIDE.fullmatch(arg)
        if match and match["path"] not in valid:
            near = difflib.get_close_matches(match["path"], valid, n=3, cutoff=0.5)
            lines.append(f"--config.{match['path']}: not a config field" +
                         (f"; did you mean {', '.join(near)}?" if near else ""))
    if not lines:
        return None
    return "\n".join(lines) + f"\nThe fields are: {', '.join(valid)} (and diffusion.schedule_kwargs.<keyword>)."


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with two additions: an unknown --config field is one error naming it and the nearest
    valid fields, and --config.diffusion.schedule_kwargs.NAME=VALUE (VALUE a Python literal, else a string)
    is set in the config's schedule_kwargs after parsing."""
    rest, kwargs, i = [], {}, 0
    while i < len(argv):
        match = _SCHEDULE_KWARG.fullmatch(argv[i])
        if match and match["value"] is None and i + 1 < len(argv):  # --config.diffusion.schedule_kwargs.NAME VALUE
            match, i = _SCHEDULE_KWARG.fullmatch(f"{argv[i]}={argv[i + 1]}"), i + 1
        if match and match["value"] is not None:
            kwargs[match["name"]] = _literal(match["value"])
        else:
            rest.append(argv[i])
        i += 1
    error = _config_override_error(rest)
    if error:
        sys.stderr.write(f"FATAL Flags parsing error:\n{error}\n")
        sys.exit(1)
    argv_before, sys.argv = sys.argv, rest  # config_flags reads its overrides from sys.argv
    try:
        rest = app.parse_flags_with_usage(rest)
    finally:
        sys.argv = argv_before
    if kwargs and _CONFIG.value is None:
        sys.stderr.write("FATAL Flags parsing error: --config.diffusion.schedule_kwargs.* needs --config\n")
        sys.exit(1)
    for name, value in kwargs.items():
        _CONFIG.value.diffusion.schedule_kwargs[name] = value
    return rest


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run() -> None:
    """Console-script entry point (`ddpm-jax`)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
