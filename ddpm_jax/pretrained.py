"""Ho et al.'s released DDPM checkpoints (diffusers layout) as our config + Flax params.

    config, params = pretrained.load("google/ddpm-cifar10-32")   # or a local directory
    pretrained.write_checkpoint(config, params, workdir)          # then main.py --mode=sample|eval|train

A released directory holds a `UNet2DModel` (config.json and
diffusion_pytorch_model.safetensors or .bin) and a `DDPMScheduler`
(scheduler_config.json), at its root or under unet/ and scheduler/. The UNet
config is mapped onto our UNet (models/unet.py) and the scheduler config onto
the diffusion fields; anything our code would compute differently is refused
with one ValueError naming the field and its value, before a weight is read.
Missing fields take diffusers' defaults (`UNET_DEFAULTS`, `SCHEDULER_DEFAULTS`,
checked against diffusers' signatures in tests/test_pretrained.py), so a
config means here what it means in diffusers.

Weights: safetensors through its NumPy API (no torch); a PyTorch .bin needs
torch (`pip install ddpm_jax[peers]`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import checkpoints, config_validation, data, train, variances
from ddpm_jax.from_config import CONFIG_DIR, build_model, image_shape, load_config_file

# --------------------------------------------------------------------------
# The UNet config.

# diffusers' UNet2DModel.__init__ defaults (diffusers 0.42): a field absent from config.json has this value.
UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)

# field -> (the only value(s) our UNet computes, why).
UNET_REQUIRED: dict[str, tuple[tuple, str]] = {
    "center_input_sample": ((False,), "inputs are already in [-1, 1]"),
    "time_embedding_type": (("positional",), "our timestep embedding is the sinusoid"),
    "flip_sin_to_cos": ((False,), "our sinusoid is [sin, cos] (layers.get_timestep_embedding)"),
    "freq_shift": ((1,), "our frequencies are 10000^(-i/(h-1)), diffusers' freq_shift=1"),
    "mid_block_type": (("UNetMidBlock2D",), "our middle is ResNet/attention/ResNet"),
    "mid_block_scale_factor": ((1,), "our residuals are not rescaled"),
    "add_attention": ((True,), "our middle has attention"),
    "downsample_padding": ((0,), "our stride-2 conv pads (0, 1) like TF 'SAME', diffusers' padding=0"),
    "downsample_type": (("conv",), "we downsample with a strided conv"),
    "upsample_type": (("conv",), "we upsample by nearest repeat + conv"),
    "act_fn": (("silu", "swish"), "our activation is swish"),
    "norm_eps": ((1e-6,), "our GroupNorm epsilon is 1e-6 (TF's)"),
    "resnet_time_scale_shift": (("default",), "our ResNet blocks add the timestep embedding"),
    "class_embed_type": ((None,), "our UNet is unconditional"),
    "num_class_embeds": ((None,), "our UNet is unconditional"),
}
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _refuse(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.json field {field}={value!r} cannot be loaded into our UNet: {allowed}")


def _with_defaults(raw: dict, defaults: dict, class_name: str, file: str) -> dict:
    """The config as diffusers reads it: unknown fields refused, absent ones filled in."""
    if raw.get("_class_name", class_name) != class_name:
        raise ValueError(f"{file} field _class_name={raw['_class_name']!r}: only {class_name} can be loaded")
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"{file} field {unknown[0]}={raw[unknown[0]]!r} is not a field of diffusers' {class_name} "
                         f"that this loader knows; it would change the model in ways not checked here")
    return {**defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}


def unet_fields(raw: dict) -> dict[str, Any]:
    """Our model fields (ch, ch_mult, …, image_size, in/out channels, dropout) from a UNet2DModel config.json."""
    cfg = _with_defaults(raw, UNET_DEFAULTS, "UNet2DModel", "config.json")
    for field, (allowed, why) in UNET_REQUIRED.items():
        if cfg[field] not in allowed:
            _refuse(field, cfg[field], f"it must be {' or '.join(map(repr, allowed))} ({why})")
    channels = tuple(cfg["block_out_channels"])
    down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
    ch = channels[0]
    if any(c % ch for c in channels):
        _refuse("block_out_channels", channels, f"each must be a multiple of the first ({ch}): ch · ch_mult")
    for field, types, known in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
        if len(types) != len(channels) or any(b not in known for b in types):
            _refuse(field, types, f"{len(channels)} blocks, each one of {sorted(known)}")
    attn_levels = [level for level, b in enumerate(down) if DOWN_BLOCKS[b]]
    if [UP_BLOCKS[b] for b in reversed(up)] != [DOWN_BLOCKS[b] for b in down]:
        _refuse("up_block_types", up, f"attention at the same levels as down_block_types {down} (mirrored)")
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        _refuse("time_embedding_dim", cfg["time_embedding_dim"], f"None or 4 · ch = {4 * ch}")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        _refuse("attn_norm_num_groups", cfg["attn_norm_num_groups"],
                f"None or norm_num_groups = {cfg['norm_num_groups']}")
    head_dim, attended = cfg["attention_head_dim"], [channels[level] for level in attn_levels] + [channels[-1]]
    if head_dim is not None and any(c != head_dim for c in attended):
        _refuse("attention_head_dim", head_dim, f"None or the channel count of every attention block {attended} "
                "(our attention has one head, as Ho et al.'s); diffusers would run several heads")
    size = cfg["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1] else size
    if not isinstance(size, int) or isinstance(size, bool):
        _refuse("sample_size", cfg["sample_size"], "an int (square images)")
    if not (isinstance(cfg["dropout"], (int, float)) and 0 <= cfg["dropout"] < 1):
        _refuse("dropout", cfg["dropout"], "a float in [0, 1)")
    return dict(ch=ch, ch_mult=tuple(c // ch for c in channels), num_res_blocks=cfg["layers_per_block"],
                attn_resolutions=tuple(size // 2 ** level for level in attn_levels),
                num_groups=cfg["norm_num_groups"], resamp_with_conv=True, image_size=size,
                in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], dropout=float(cfg["dropout"]))


# --------------------------------------------------------------------------
# The scheduler config.

# diffusers' DDPMScheduler.__init__ defaults (diffusers 0.42).
SCHEDULER_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    steps_offset=0, rescale_betas_zero_snr=False)
# timestep_spacing and steps_offset place diffusers' K < T inference steps: our sub-chains are
# schedules.space_timesteps', chosen by sampling.num_steps. They do not change the model or the T-step chain.

# diffusers name -> ours. 'learned' (the output IS σ², not log σ²) and 'fixed_large_log' are refused.
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "learned_range": "learned_range"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _beta_schedule(cfg: dict) -> tuple[str, dict[str, Any]]:
    """(our schedule name, its kwargs) giving the β's DDPMScheduler builds from this config."""
    if cfg["trained_betas"] is not None:
        return "custom", {"betas": [float(b) for b in cfg["trained_betas"]]}
    ends = {"beta_start": float(cfg["beta_start"]), "beta_end": float(cfg["beta_end"])}
    named = {"linear": ("linear", ends), "scaled_linear": ("quadratic", ends), "sigmoid": ("sigmoid", ends),
             # GLIDE's cosine (N&D eq. 17) with s = 0.008 and β capped at 0.999, as betas_for_alpha_bar
             "squaredcos_cap_v2": ("cosine", {"s": 0.008, "max_beta": 0.999})}
    if cfg["beta_schedule"] not in named:
        raise ValueError(f"scheduler_config.json field beta_schedule={cfg['beta_schedule']!r} is not supported; "
                         f"one of {sorted(named)} (or trained_betas)")
    return named[cfg["beta_schedule"]]


def diffusion_fields(raw: dict) -> dict[str, Any]:
    """schedule, schedule_kwargs, num_timesteps, variance, mean_type, clip_x0 from a DDPMScheduler config."""
    cfg = _with_defaults(raw, SCHEDULER_DEFAULTS, "DDPMScheduler", "scheduler_config.json")

    def refuse(field, allowed):
        raise ValueError(f"scheduler_config.json field {field}={cfg[field]!r} is not supported: {allowed}")

    if cfg["variance_type"] not in VARIANCE_TYPES:
        refuse("variance_type", f"one of {sorted(VARIANCE_TYPES)}")
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        refuse("prediction_type", f"one of {sorted(PREDICTION_TYPES)}")
    if cfg["thresholding"]:
        refuse("thresholding", "False (our sampler clips x̂_0 to [-1, 1], it does not threshold dynamically)")
    if cfg["clip_sample"] and cfg["clip_sample_range"] != 1.0:
        refuse("clip_sample_range", "1.0 (our sampler clips x̂_0 to [-1, 1])")
    if cfg["rescale_betas_zero_snr"]:
        refuse("rescale_betas_zero_snr", "False (our zero-terminal-SNR floor on ᾱ_T differs from diffusers')")
    if not isinstance(cfg["num_train_timesteps"], int) or cfg["num_train_timesteps"] < 2:
        refuse("num_train_timesteps", "an int >= 2")
    name, kwargs = _beta_schedule(cfg)
    return dict(schedule=name, schedule_kwargs=kwargs, num_timesteps=cfg["num_train_timesteps"],
                variance=VARIANCE_TYPES[cfg["variance_type"]], mean_type=PREDICTION_TYPES[cfg["prediction_type"]],
                clip_x0=bool(cfg["clip_sample"]))


# --------------------------------------------------------------------------
# The experiment config.

# A word of the checkpoint's name -> the data set it was trained on (data.DATASETS).
DATASET_WORDS = {"cifar10": "cifar10", "celebahq": "celeb_a_hq", "church": "lsun/church_outdoor",
                 "bedroom": "lsun/bedroom", "cat": "lsun/cat"}


def dataset_from_name(name: str) -> str | None:
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    found = [dataset for word, dataset in DATASET_WORDS.items() if word in words]
    return found[0] if len(found) == 1 else None


def make_config(unet: dict, diff: dict, dataset: str) -> ml_collections.ConfigDict:
    """default.py's config with the model, diffusion, data, sampling and eval fields of this checkpoint."""
    if dataset not in data.DATASETS:
        raise ValueError(f"dataset must be one of {sorted(data.DATASETS)}, got {dataset!r}")
    info = data.DATASETS[dataset]
    channels = info.image_shape[-1]
    if unet["in_channels"] != channels:
        _refuse("in_channels", unet["in_channels"], f"{channels}, the channels of dataset {dataset!r}")
    wanted = variances.model_channels(channels, variances.get(diff["variance"]).from_network)
    if unet["out_channels"] != wanted:
        _refuse("out_channels", unet["out_channels"], f"{wanted} for variance_type {diff['variance']!r} "
                "(2 · in_channels exactly when the variance is learned)")
    config = load_config_file(CONFIG_DIR / "default.py")
    config.data.dataset = dataset
    if unet["image_size"] != info.image_shape[0]:
        if not info.resize:
            _refuse("sample_size", unet["image_size"], f"{info.image_shape[0]}, the size of dataset {dataset!r}")
        config.data.image_size = unet["image_size"]
    for field in config_validation.FIELDS["model"]:
        config.model[field] = unet[field]
    d = config.diffusion
    d.schedule, d.num_timesteps, d.variance, d.mean_type = (diff["schedule"], diff["num_timesteps"],
                                                            diff["variance"], diff["mean_type"])
    d.schedule_kwargs = ml_collections.ConfigDict(diff["schedule_kwargs"])
    d.loss_type = "hybrid" if diff["variance"] == "learned_range" else "simple"
    config.training.dropout = unet["dropout"]
    config.sampling.variance = diff["variance"]
    config.sampling.clip_x0 = diff["clip_x0"]
    config.eval.split = "test" if "test" in info.splits else info.splits[-1]
    config_validation.validate_config(config, process_count=1, local_device_count=1)
    return config


# --------------------------------------------------------------------------
# The weights.

# diffusers module name -> ours, for the leaf-owning modules.
MODULE_NAMES = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut", "group_norm": "norm",
                "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
                "to_out": "proj_out", "proj_attn": "proj_out", "conv_norm_out": "norm_out",
                "linear_1": "temb_dense0", "linear_2": "temb_dense1"}
_BLOCKS = {"resnets": "block", "attentions": "attn"}


def flax_path(key: str, num_levels: int) -> tuple[str, ...] | None:
    """Our param path of a diffusers state-dict key ('down_blocks.1.attentions.0.to_q.weight'), or None."""
    parts = key.replace("to_out.0.", "to_out.").split(".")
    *modules, leaf = parts
    if not modules:
        return None
    if modules[:1] == ["time_embedding"]:
        modules = modules[1:]
    elif modules[:1] in (["down_blocks"], ["up_blocks"]) and len(modules) >= 4:
        kind, level, sub, index, *modules = modules
        level = int(level) if kind == "down_blocks" else num_levels - 1 - int(level)
        prefix = kind.split("_")[0]
        if sub in _BLOCKS:
            modules = [f"{prefix}_{level}_{_BLOCKS[sub]}_{index}", *modules]
        elif sub in ("downsamplers", "upsamplers") and index == "0":
            modules = [f"{prefix}_{level}_{sub[:-2]}", *modules]
        else:
            return None
    elif modules[:1] == ["mid_block"] and len(modules) >= 3:
        _, sub, index, *modules = modules
        if sub not in _BLOCKS:
            return None
        modules = [f"mid_{_BLOCKS[sub]}_{int(index) + 1}", *modules]
    modules = [MODULE_NAMES.get(m, m) for m in modules]
    if leaf == "weight":
        leaf = "scale" if modules[-1].startswith("norm") else "kernel"
    return (*modules, leaf)


def torch_to_flax(value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """conv [O, I, kh, kw] -> [kh, kw, I, O]; linear [O, I] or 1×1 conv [O, I, 1, 1] -> dense [I, O]."""
    if value.ndim == 4 and len(target_shape) == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim in (2, 4) and len(target_shape) == 2:
        return value.reshape(value.shape[:2]).T
    return value


def convert_weights(state_dict: dict[str, np.ndarray], target: Any) -> Any:
    """Our param tree (float32 NumPy) shaped like `target` (jax.eval_shape of UNet.init) from a diffusers state dict.

    Raises ValueError naming the torch keys that map nowhere, the leaves left empty, or a shape mismatch.
    """
    flat_target = {tuple(k.key for k in path): leaf.shape
                   for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    num_levels = 1 + max(int(p[0].split("_")[1]) for p in flat_target if p[0].startswith("down_"))
    filled, leftover = {}, []
    for key, value in state_dict.items():
        path = flax_path(key, num_levels)
        if path not in flat_target or path in filled:
            leftover.append(key)
            continue
        converted = torch_to_flax(np.asarray(value, dtype=np.float32), flat_target[path])
        if converted.shape != tuple(flat_target[path]):
            raise ValueError(f"weight {key} has shape {tuple(value.shape)}, which does not convert to "
                             f"{'/'.join(path)} of shape {tuple(flat_target[path])}")
        filled[path] = converted
    missing = sorted("/".join(p) for p in flat_target.keys() - filled.keys())
    if leftover or missing:
        raise ValueError(f"the weights do not match the UNet of config.json: torch keys left over "
                         f"{sorted(leftover)[:8]}"
                         f" ({len(leftover)} in all), our params left empty {missing[:8]} ({len(missing)} in all)")
    # flat_target lists the leaves in flatten order
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), [filled[p] for p in flat_target])


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A .safetensors file through safetensors' NumPy API, a PyTorch .bin through torch (CPU)."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
        return load_file(str(path))
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError(f"{path} is a PyTorch file and reading it needs torch (pip install 'ddpm_jax[peers]'); "
                          "or convert it to diffusion_pytorch_model.safetensors") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


# --------------------------------------------------------------------------
# The public entry points.


def resolve(path_or_hub_id: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(UNet directory, scheduler directory) of a local release, downloading a hub id when it is not a local path."""
    root = pathlib.Path(path_or_hub_id).expanduser()
    if not root.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_hub_id) is None:
            raise FileNotFoundError(f"{path_or_hub_id} is neither a directory nor a hub id such as "
                                    "google/ddpm-cifar10-32")
        root = _download(path_or_hub_id)
    if (root / "unet" / "config.json").exists():  # a pipeline snapshot: model_index.json, unet/, scheduler/
        return root / "unet", root / "scheduler"
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"{root} has no config.json (nor unet/config.json): not a diffusers UNet2DModel "
                                "release")
    return root, root


def _download(repo_id: str) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise FileNotFoundError(f"{repo_id} is not a local directory, and downloading it from the Hugging Face hub "
                                "needs huggingface_hub (pip install huggingface_hub), or download it yourself and "
                                "pass the directory") from None
    configs = ["config.json", "scheduler_config.json", "*/config.json", "*/scheduler_config.json", "model_index.json"]
    for weights in ("*.safetensors", "*.bin"):  # the .bin only when the release has no safetensors
        root = pathlib.Path(snapshot_download(repo_id, allow_patterns=configs + [weights]))
        if any(root.rglob(weights)):
            return root
    return root


def _weights_file(directory: pathlib.Path) -> pathlib.Path:
    for name in WEIGHT_FILES:
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{directory} has none of {list(WEIGHT_FILES)}")


def load(path_or_hub_id: str, *, dataset: str | None = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a released diffusers DDPM: a directory, or a hub id when no such directory exists.

    dataset: a data.DATASETS name; None guesses it from the name (cifar10, celebahq, church, bedroom,
    cat) and raises ValueError when the name says nothing. params are float32 jax arrays in the
    tree of `build_model(config).init`.
    """
    unet_dir, scheduler_dir = resolve(str(path_or_hub_id))
    with open(unet_dir / "config.json", encoding="utf-8") as f:
        unet = unet_fields(json.load(f))
    scheduler_file = scheduler_dir / "scheduler_config.json"
    if not scheduler_file.exists():
        raise FileNotFoundError(f"{scheduler_file} is missing: the schedule (β's, T, σ_t, prediction type) "
                                "comes from it")
    with open(scheduler_file, encoding="utf-8") as f:
        diff = diffusion_fields(json.load(f))
    dataset = dataset or dataset_from_name(str(path_or_hub_id))
    if dataset is None:
        raise ValueError(f"dataset cannot be guessed from the name {path_or_hub_id!r}; pass dataset=, one of "
                         f"{sorted(data.DATASETS)}")
    config = make_config(unet, diff, dataset)
    model = build_model(config)
    size = image_shape(config)
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *size)),
                                               jnp.zeros((1,), jnp.int32), train=False)["params"])
    params = convert_weights(read_state_dict(_weights_file(unet_dir)), target)
    return config, jax.tree.map(jnp.asarray, params)


def write_checkpoint(config: ml_collections.ConfigDict, params: Any, workdir: str, *, step: int = 0,
                     source: str | None = None) -> None:
    """workdir/checkpoints/<step>: params as both params and EMA params, a fresh Adam state, zero counters.

    `main.py --workdir=W --mode=sample|eval` reads it like a trained run's, and training from
    W resumes from it (fine-tuning with config.training's optimizer). `source` (the directory
    or hub id) is recorded in the checkpoint's meta as 'pretrained_from'.
    """
    t = config.training
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    zero = jnp.zeros((), jnp.int32)
    state = train.TrainState(step=jnp.asarray(step, jnp.int32), params=params, ema_params=params,
                             opt_state=train.make_optimizer(t.lr, t.warmup_steps, t.grad_clip).init(params),
                             nonfinite_count=zero, consecutive_nonfinite=zero)
    manager = checkpoints.make_manager(workdir, asynchronous=False)
    try:
        meta = {**checkpoints.run_metadata(config), "pretrained_from": source}
        checkpoints.save(manager, step, train.without_ema(state), state.ema_params, meta)
    finally:
        manager.wait_until_finished()
        manager.close()
    checkpoints.write_config(workdir, config)


def convert_into_workdir(source: str, workdir: str, *, dataset: str | None = None) -> bool:
    """A release as `workdir`'s checkpoint step 0, unless the workdir has checkpoints already (then nothing is
    converted again). Returns True when it converted. One process only: the existence check would race."""
    ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
    if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
        logging.info("%s already has checkpoints; --pretrained=%s is not converted again", workdir, source)
        return False
    config, params = load(source, dataset=dataset)
    write_checkpoint(config, params, workdir, source=source)
    return True
