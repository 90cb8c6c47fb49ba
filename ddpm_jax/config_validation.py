"""Checks a whole experiment config before anything is built or compiled.

`validate_config(config)` raises ONE ValueError naming the first bad field by
its dotted path ("training.batch_size") and what is allowed. The allowed
fields are `FIELDS`, read from experiments/configs/default.py: a key that is not in it (a typo such as
`training.warmup`) or missing from the config is an error too. Checks owned by
other modules are delegated to them (the β range to `schedules.get_schedule`,
the UNet geometry to `models.check_unet_config`, the dataset to
`data.validate_data_config`, loss/variance compatibility to
`losses.validate_loss_type`), and their messages are prefixed with the path.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import ml_collections

from ddpm_jax import data, diffusion, from_config, losses, schedules, variances
from ddpm_jax.models import check_unet_config



def schema() -> dict[str, tuple[str, ...]]:
    """group -> field names, read from the one schema, experiments/configs/default.py (`from_config.default_config`).
    The per-field checks live in `_check_*` below."""
    default = from_config.default_config()
    return {group: tuple(default[group].keys()) for group in default.keys()}


FIELDS: dict[str, tuple[str, ...]] = schema()


def _cli_variances(trained: variances.Variance) -> list[str]:
    """σ names the CLI sampler can run on a model trained with `trained`: no data statistic to estimate (the
    σ-ablation estimates those), σ² from the network only when the model outputs it."""
    return [name for name, v in variances.VARIANCES.items()
            if not v.needs and (not v.from_network or trained.from_network)]


def _trainable_variances() -> list[str]:
    return [name for name, v in variances.VARIANCES.items() if not v.needs]


def _fail(path: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{path} must be {allowed}, got {value!r}")


def _int(path: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        _fail(path, f"an int >= {minimum}" + (f" and <= {maximum}" if maximum is not None else ""), value)


def _float(path: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        _fail(path, allowed, value)


def _bool(path: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(path, "True or False", value)


def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(path, f"one of {list(allowed)}", value)


def _delegate(where: str, paths: dict[str, str], check: Callable[[], None]) -> None:
    """Runs another module's check. Its messages start with a field name, replaced by the dotted path
    from `paths`; any other message is prefixed with `where`."""
    try:
        check()
    except ValueError as err:
        first, _, rest = str(err).partition(" ")
        raise ValueError(f"{paths[first]} {rest}" if first in paths else f"{where}: {err}") from None


def _check_keys(config: ml_collections.ConfigDict) -> None:
    unknown = sorted(set(config.keys()) - set(FIELDS))
    missing = sorted(set(FIELDS) - set(config.keys()))
    if unknown or missing:
        raise ValueError(f"config groups must be exactly {list(FIELDS)}; unknown: {unknown}, missing: {missing}")
    for group, names in FIELDS.items():
        present = set(config[group].keys())
        unknown, missing = sorted(present - set(names)), sorted(set(names) - present)
        if unknown:
            raise ValueError(f"{group}.{unknown[0]} is not a config field; {group} has {list(names)}")
        if missing:
            raise ValueError(f"{group}.{missing[0]} is missing; {group} needs {list(names)}")


def _check_data(cfg: ml_collections.ConfigDict) -> None:
    _choice("data.dataset", cfg.dataset, tuple(sorted(data.DATASETS)))
    if len(data.DATASETS[cfg.dataset].image_shape) != 3:
        images = sorted(n for n, i in data.DATASETS.items() if len(i.image_shape) == 3)
        _fail("data.dataset", f"an image dataset (the UNet takes [B, H, W, C]), one of {images}", cfg.dataset)
    _delegate("data", {"image_size": "data.image_size"}, lambda: data.validate_data_config(cfg.dataset, cfg.image_size))
    if cfg.random_flip is not None:
        _bool("data.random_flip", cfg.random_flip)
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        _fail("data.data_dir", "None or a directory path (str)", cfg.data_dir)
    _int("data.worker_count", cfg.worker_count, 0)


def _check_diffusion(cfg: ml_collections.ConfigDict) -> None:
    _choice("diffusion.schedule", cfg.schedule, tuple(schedules.SCHEDULES))
    _int("diffusion.num_timesteps", cfg.num_timesteps, 1, schedules.MAX_TIMESTEPS)
    _bool("diffusion.zero_terminal_snr", cfg.zero_terminal_snr)
    kwargs = dict(cfg.schedule_kwargs)
    paths = {k: f"diffusion.schedule_kwargs.{k}" for k in kwargs} | {"num_timesteps": "diffusion.num_timesteps"}
    _delegate("diffusion.schedule_kwargs", paths, lambda: schedules.get_schedule(
        cfg.schedule, cfg.num_timesteps, zero_terminal_snr=cfg.zero_terminal_snr, **kwargs))
    if cfg.variance not in _trainable_variances():
        _fail("diffusion.variance", f"one of {_trainable_variances()} (a σ_t that needs a data statistic, such as "
              "'analytic', is a sampling-time choice for a model trained with a fixed variance)", cfg.variance)
    _choice("diffusion.mean_type", cfg.mean_type, diffusion.MEAN_TYPES)
    _choice("diffusion.loss_type", cfg.loss_type, losses.LOSS_TYPES)
    _delegate("diffusion", {"loss_type": "diffusion.loss_type"},
              lambda: losses.validate_loss_type(cfg.loss_type, cfg.variance))


def _check_training(cfg: ml_collections.ConfigDict, num_shards: int) -> None:
    _int("training.batch_size", cfg.batch_size, 1)
    if cfg.batch_size % num_shards:
        _fail("training.batch_size", f"a multiple of process_count x local_device_count = {num_shards} "
              "(the global batch is split evenly over all devices)", cfg.batch_size)
    _int("training.num_train_steps", cfg.num_train_steps, 1)
    _float("training.lr", cfg.lr, "a float > 0", lambda v: v > 0)
    _int("training.warmup_steps", cfg.warmup_steps, 0)
    _float("training.grad_clip", cfg.grad_clip, "a float > 0 (global-norm clipping)", lambda v: v > 0)
    _float("training.ema_decay", cfg.ema_decay, "a float in [0, 1)", lambda v: 0 <= v < 1)
    _float("training.dropout", cfg.dropout, "a float in [0, 1)", lambda v: 0 <= v < 1)
    _bool("training.bf16", cfg.bf16)
    _bool("training.ordered_allreduce", cfg.ordered_allreduce)
    _bool("training.async_checkpointing", cfg.async_checkpointing)
    _int("training.seed", cfg.seed, 0)
    for name in ("log_every", "save_every", "keep_checkpoints", "max_consecutive_nonfinite"):
        _int(f"training.{name}", cfg[name], 1)
    _int("training.sample_every", cfg.sample_every, 0)


def _check_steps(path: str, value: Any, num_timesteps: int) -> None:
    if value is not None:
        _int(path, value, 1, num_timesteps)


def _check_sampling(cfg: ml_collections.ConfigDict, trained_variance: str, num_timesteps: int) -> None:
    _check_steps("sampling.num_steps", cfg.num_steps, num_timesteps)
    allowed = _cli_variances(variances.get(trained_variance))
    if cfg.variance not in allowed:
        _fail("sampling.variance", f"one of {allowed} for a model trained with diffusion.variance={trained_variance!r} "
              "(σ choices that need a data statistic, such as 'analytic', run in experiments/sigma_ablation)",
              cfg.variance)
    if cfg.eta is not None:
        _float("sampling.eta", cfg.eta, "None (ancestral sampling) or a float in [0, 1] (DDIM)", lambda v: 0 <= v <= 1)
        if cfg.variance != "fixed_small":
            _fail("sampling.variance", "'fixed_small' when sampling.eta is set (DDIM's η sets σ_t itself; "
                  "set sampling.eta=None for ancestral sampling with another σ_t)", cfg.variance)
    _int("sampling.batch", cfg.batch, 1)
    _bool("sampling.clip_x0", cfg.clip_x0)


def _check_eval(cfg: ml_collections.ConfigDict, dataset: str, num_timesteps: int) -> None:
    _choice("eval.split", cfg.split, data.DATASETS[dataset].splits)
    _int("eval.batch_size", cfg.batch_size, 1)
    _int("eval.num_batches", cfg.num_batches, 1)
    _check_steps("eval.num_steps", cfg.num_steps, num_timesteps)


def validate_config(config: ml_collections.ConfigDict, *, process_count: int | None = None,
                    local_device_count: int | None = None) -> None:
    """Raises one ValueError naming the first invalid field; nothing is compiled.

    process_count, local_device_count default to this run's (jax.process_count(),
    jax.local_device_count()): the global batch must split evenly over all devices.
    """
    process_count = jax.process_count() if process_count is None else process_count
    local_device_count = jax.local_device_count() if local_device_count is None else local_device_count
    _check_keys(config)
    _check_data(config.data)
    _check_diffusion(config.diffusion)
    _check_training(config.training, process_count * local_device_count)
    m = config.model
    for name in ("ch_mult", "attn_resolutions"):
        value = m[name]
        ints = isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ints:
            _fail(f"model.{name}", "a tuple of ints", value)
    paths = {k: f"model.{k}" for k in FIELDS["model"]} | {"image_size": "data.image_size"}
    _delegate("model", paths, lambda: check_unet_config(
        from_config.image_shape(config)[0], m.ch, tuple(m.ch_mult), tuple(m.attn_resolutions), m.num_groups,
        num_res_blocks=m.num_res_blocks, out_channels=from_config.out_channels(config)))
    _bool("model.resamp_with_conv", m.resamp_with_conv)
    _check_sampling(config.sampling, config.diffusion.variance, config.diffusion.num_timesteps)
    if config.training.sample_every:  # the training loop's sample grids use every local device
        check_sampling_batch(config.sampling.batch, local_device_count)
    _check_eval(config.eval, config.data.dataset, config.diffusion.num_timesteps)


def check_sampling_batch(batch: int, local_device_count: int) -> None:
    """The sampler splits sampling.batch evenly over the local devices."""
    if batch % local_device_count:
        _fail("sampling.batch", f"a multiple of the local device count {local_device_count} (samples are split "
              "evenly over the devices)", batch)
