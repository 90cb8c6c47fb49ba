"""Everything built from an experiment config, in one place: config files, the image shape, the
σ record and the output channels it implies, the UNet, the schedule and the model function.

The config schema itself is `experiments/configs/default.py`: `default_config()` loads it,
and every other config file starts from it through `load_config_file`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.tree_util import Partial

from ddpm_jax import data, schedules, variances
from ddpm_jax.models import UNet

Array = jax.Array
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def load_config_file(path: str | pathlib.Path, argument: str | None = None) -> ml_collections.ConfigDict:
    """get_config() (or get_config(argument)) of a config file loaded by path; a bare name is looked up in
    experiments/configs/ ("default.py", "digits.py")."""
    path = pathlib.Path(path)
    if not path.is_file() and (CONFIG_DIR / path).is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist (nor in {CONFIG_DIR.name}/)")
    spec = importlib.util.spec_from_file_location(f"ddpm_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if argument is None else module.get_config(argument)


def default_config() -> ml_collections.ConfigDict:
    """The schema: every group and field an experiment config has, with Ho et al.'s CIFAR-10 defaults."""
    return load_config_file(CONFIG_DIR / "default.py")


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """[H, W, C] of one training image."""
    return data.image_shape(config.data.dataset, config.data.image_size)


def variance_record(config: ml_collections.ConfigDict) -> variances.Variance:
    """The σ record the model is trained with (config.diffusion.variance)."""
    return variances.get(config.diffusion.variance)


def channels_for(config: ml_collections.ConfigDict, record: variances.Variance) -> int:
    """The output channels a sampler or bound with σ record `record` reads: 2C when the network outputs σ², else C."""
    return variances.model_channels(image_shape(config)[-1], record.from_network)


def out_channels(config: ml_collections.ConfigDict) -> int:
    """The UNet's output channels: C for ε (or x_0, v) alone; 2C when the variance is learned (N&D §3.1)."""
    return channels_for(config, variance_record(config))


def build_model(config: ml_collections.ConfigDict) -> UNet:
    m = config.model
    return UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=config.training.dropout,
                out_channels=out_channels(config), num_groups=m.num_groups,
                resamp_with_conv=m.resamp_with_conv, dtype=jnp.bfloat16 if config.training.bf16 else jnp.float32)


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    d = config.diffusion
    return schedules.get_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr,
                                  **dict(d.schedule_kwargs))


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """model_fn(params, x_t, t) in eval mode (no dropout), keeping the first `channels` output channels.

    Hashable, so `jax.tree_util.Partial(EvalModel(...), params)` reuses compiled
    samplers; channels = C drops a learned variance for a fixed-σ sampler.
    """

    model: UNet
    channels: int

    def __call__(self, params: Any, x: Array, t: Array) -> Array:
        return self.model.apply({"params": params}, x, t, train=False)[..., :self.channels]


def model_fn(config: ml_collections.ConfigDict, params: Any,
             variance: str | variances.Variance | None = None) -> Partial:
    """The model_fn(x_t, t) that the sampler and the bound call for σ choice `variance` (default: the trained
    one): all output channels when that choice reads σ² from the network, the first C otherwise."""
    record = variance_record(config) if variance is None else variances.get(variance)
    return Partial(EvalModel(build_model(config), channels_for(config, record)), params)
