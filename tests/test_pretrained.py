"""pretrained: diffusers DDPM releases -> our config and params, checked against diffusers' own outputs.

The fixture (tests/fixtures/pretrained_tiny, written by scripts/make_pretrained_fixture.py)
is a tiny UNet2DModel with google/ddpm-cifar10-32's structure and diffusers' float64
outputs for it: the first test needs neither torch nor diffusers. The tests marked
`peers` rebuild models with diffusers itself and are skipped without it. No test
touches the network.
"""

import functools
import importlib.util
import inspect
import json
import pathlib
import shutil
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from ddpm_jax import checkpoints, config_validation, pretrained, schedules
from ddpm_jax.from_config import build_model, image_shape
from ddpm_jax.models import count_params, layers
from ddpm_jax.models import unet as unet_module

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "pretrained_tiny"
SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "make_pretrained_fixture.py"
TOLERANCE = 1e-5  # max |ours − diffusers| / max |diffusers|, per example

# google/ddpm-cifar10-32's and google/ddpm-celebahq-256's config.json (the fields that differ from
# diffusers' defaults), as released with _diffusers_version 0.0.4.
CIFAR10_UNET = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
CELEBAHQ_UNET = {**CIFAR10_UNET, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
                 "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
CIFAR10_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                     "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                     "variance_type": "fixed_large"}


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_pretrained_fixture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peers():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return _fixture_script()


@functools.cache
def _fixture():
    # celeb_a: a 3-channel data set that may be resized to the fixture's 16×16
    return pretrained.load(str(FIXTURE), dataset="celeb_a")


def _eps(config, params, x, t) -> np.ndarray:
    return np.asarray(build_model(config).apply({"params": params}, x, t, train=False), np.float64)


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[B]: max |ours − reference| / max |reference| over each example."""
    axes = tuple(range(1, reference.ndim))
    return np.abs(ours - reference).max(axis=axes) / np.abs(reference).max(axis=axes)


def _fixture_error() -> np.ndarray:
    config, params = _fixture()
    ref = np.load(FIXTURE / "reference.npz")
    return _relative_error(_eps(config, params, ref["x"], ref["t"]), ref["eps"])


# --------------------------------------------------------------------------
# The fixture against diffusers' recorded outputs (no torch needed).


def test_fixture_output_matches_diffusers():
    err = _fixture_error()
    print(f"max relative error vs diffusers (float64) at t = 0, 1, T/2, T-1: {err}")
    assert err.max() <= TOLERANCE


def test_fixture_config_is_a_valid_experiment_config():
    config, params = _fixture()
    config_validation.validate_config(config, process_count=1, local_device_count=1)
    m, d = config.model, config.diffusion
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.num_groups) == (
        8, (1, 2, 2), 1, (8,), 4)
    assert (d.schedule, d.num_timesteps, dict(d.schedule_kwargs), d.variance, d.mean_type) == (
        "linear", 1000, {"beta_start": 0.0001, "beta_end": 0.02}, "fixed_large", "eps")
    assert (config.data.dataset, config.data.image_size) == ("celeb_a", 16)
    assert (config.sampling.variance, config.sampling.clip_x0) == ("fixed_large", True)
    leaves = jax.tree.leaves(params)
    assert count_params(params) == 71_323 and all(leaf.dtype == np.float32 for leaf in leaves)
    assert all(np.all(np.asarray(leaf) != 0) for leaf in leaves)  # every weight came from the file


# --------------------------------------------------------------------------
# Negative controls: the comparison above catches the two easiest mistakes.


def _pad_1_1(original):
    def conv3x3(features, name, dtype, init_scale=1.0, stride=1):
        if stride == 1:
            return original(features, name, dtype, init_scale, stride)
        # diffusers' downsample_padding=1: pad (1, 1) on both sides instead of TF's (0, 1)
        return nn.Conv(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype, name=name)
    return conv3x3


def _cos_sin(t, dim):
    emb = layers.get_timestep_embedding(t, dim)
    return np.concatenate([emb[:, dim // 2:], emb[:, :dim // 2]], axis=1)  # flip_sin_to_cos=True


@pytest.mark.parametrize("mistake", ["downsample_padding_1", "cos_sin_embedding"])
def test_comparison_catches_a_wrong_layer(monkeypatch, mistake):
    if mistake == "downsample_padding_1":
        monkeypatch.setattr(layers, "conv3x3", _pad_1_1(layers.conv3x3))
    else:
        monkeypatch.setattr(unet_module, "get_timestep_embedding", _cos_sin)
    err = _fixture_error()
    print(f"{mistake}: max relative error {err.max():.3g} (per t: {err})")
    assert err.max() > 1e-2


# --------------------------------------------------------------------------
# Refusals: a config our UNet or schedule would compute differently fails before any weight is read.

UNET_REFUSALS = [
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("downsample_padding", 1), ("norm_eps", 1e-5),
    ("act_fn", "gelu"), ("time_embedding_type", "fourier"), ("attention_head_dim", 8),
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_scale_factor", 2), ("center_input_sample", True), ("mid_block_type", None),
    ("add_attention", False), ("downsample_type", "resnet"), ("upsample_type", "resnet"),
    ("time_embedding_dim", 64), ("attn_norm_num_groups", 2), ("block_out_channels", [8, 12, 16]),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ("out_channels", 6), ("in_channels", 1), ("sample_size", [16, 32]), ("_class_name", "UNet2DConditionModel"),
    ("cross_attention_dim", 768),  # a field this loader does not know
]
SCHEDULER_REFUSALS = [
    ("beta_schedule", "laplace"), ("variance_type", "learned"), ("variance_type", "fixed_large_log"),
    ("prediction_type", "flow"), ("thresholding", True), ("clip_sample_range", 2.0),
    ("rescale_betas_zero_snr", True), ("_class_name", "EulerDiscreteScheduler"),
]


def _configs_only(tmp_path, unet=None, scheduler=None) -> pathlib.Path:
    """The fixture's two config files with `unet`/`scheduler` merged in, and no weights file."""
    for name, changes in (("config.json", unet), ("scheduler_config.json", scheduler)):
        raw = json.loads((FIXTURE / name).read_text())
        (tmp_path / name).write_text(json.dumps({**raw, **(changes or {})}))
    return tmp_path


@pytest.mark.parametrize("field,value", UNET_REFUSALS + SCHEDULER_REFUSALS)
def test_unsupported_field_is_refused_naming_it(tmp_path, field, value):
    in_unet = (field, value) in UNET_REFUSALS
    directory = _configs_only(tmp_path, **{"unet" if in_unet else "scheduler": {field: value}})
    with pytest.raises(ValueError) as err:  # not FileNotFoundError: the missing weights are never looked for
        pretrained.load(str(directory), dataset="celeb_a")
    message = str(err.value)
    assert field in message and ("config.json" if in_unet else "scheduler_config.json") in message
    if not isinstance(value, list):
        assert repr(value) in message


def test_absent_field_takes_diffusers_default(tmp_path):
    raw = json.loads((FIXTURE / "config.json").read_text())
    del raw["flip_sin_to_cos"]  # diffusers' default is True: [cos, sin]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shutil.copy(FIXTURE / "scheduler_config.json", tmp_path)
    with pytest.raises(ValueError, match="flip_sin_to_cos=True"):
        pretrained.load(str(tmp_path), dataset="celeb_a")


def test_unknown_dataset_name_asks_for_it(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        pretrained.load(str(_configs_only(tmp_path)))


# --------------------------------------------------------------------------
# The released models' configs, mapped without their weights.


@pytest.mark.parametrize("hub_id,dataset", [
    ("google/ddpm-cifar10-32", "cifar10"), ("google/ddpm-celebahq-256", "celeb_a_hq"),
    ("google/ddpm-church-256", "lsun/church_outdoor"), ("google/ddpm-ema-bedroom-256", "lsun/bedroom"),
    ("google/ddpm-cat-256", "lsun/cat"), ("/data/my-model", None)])
def test_dataset_from_name(hub_id, dataset):
    assert pretrained.dataset_from_name(hub_id) == dataset


@pytest.mark.parametrize("unet,dataset,expected", [
    (CIFAR10_UNET, "cifar10", (128, (1, 2, 2, 2), 2, (16,), 32, None, 35_746_307)),
    (CELEBAHQ_UNET, "celeb_a_hq", (128, (1, 1, 2, 2, 4, 4), 2, (16,), 32, None, 113_673_219)),
])
def test_released_configs_map_to_ho_et_al_models(unet, dataset, expected):
    config = pretrained.make_config(pretrained.unet_fields(unet), pretrained.diffusion_fields(CIFAR10_SCHEDULER),
                                    dataset)
    m = config.model
    size = image_shape(config)
    shapes = jax.eval_shape(lambda: build_model(config).init(
        jax.random.PRNGKey(0), np.zeros((1, *size), np.float32), np.zeros((1,), np.int32), train=False))
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.num_groups,
            config.data.image_size, count_params(shapes["params"])) == expected
    assert config.eval.split in ("test", "train")


# --------------------------------------------------------------------------
# Checkpoints in our format.


def test_written_checkpoint_restores_identical_params(tmp_path):
    config, params = _fixture()
    pretrained.write_checkpoint(config, params, str(tmp_path), source=str(FIXTURE))
    restored = checkpoints.load_ema_params(str(tmp_path))
    assert restored.step == 0
    assert restored.config.model.to_dict() == config.model.to_dict()
    assert jax.tree.structure(restored.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, meta, _ = checkpoints.load_item(str(tmp_path), "state")
    assert meta["pretrained_from"] == str(FIXTURE)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state["step"]) == 0 and int(state["nonfinite_count"]) == 0
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(state["opt_state"]))  # fresh Adam: 0 moments


# --------------------------------------------------------------------------
# Files and the hub, without the network.


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(FIXTURE)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config, _ = pretrained.load("someone/ddpm-celebahq-tiny")
    assert calls[0][0] == "someone/ddpm-celebahq-tiny" and "*.safetensors" in calls[0][1]
    assert config.data.dataset == "celeb_a_hq"


def test_hub_id_without_huggingface_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="huggingface_hub"):
        pretrained.load("someone/ddpm-cifar10-32")


def test_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ImportError, match="torch"):
        pretrained.read_state_dict(tmp_path / "diffusion_pytorch_model.bin")


def test_leftover_and_missing_weights_are_named():
    config, params = _fixture()
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert "down_1_attn_0/q/kernel" in flat
    from safetensors.numpy import load_file
    state = load_file(str(FIXTURE / "diffusion_pytorch_model.safetensors"))
    state["down_blocks.1.attentions.0.extra.weight"] = np.ones(3, np.float32)
    del state["mid_block.resnets.1.conv2.bias"]
    with pytest.raises(ValueError, match=r"extra\.weight.*mid_block_2/conv2/bias"):
        pretrained.convert_weights(state, params)


# --------------------------------------------------------------------------
# Against diffusers itself (skipped without torch and diffusers).


def test_defaults_are_diffusers_defaults():
    _peers()
    from diffusers import DDPMScheduler, UNet2DModel

    for ours, cls in ((pretrained.UNET_DEFAULTS, UNet2DModel), (pretrained.SCHEDULER_DEFAULTS, DDPMScheduler)):
        params = inspect.signature(cls.__init__).parameters
        theirs = {k: p.default for k, p in params.items() if k != "self"}
        assert ours == theirs, cls.__name__


def test_fresh_model_from_bin_with_deprecated_attention_names(tmp_path):
    """A new random model (2 layers per block), saved as .bin with the old attention keys and as
    safetensors: both load to the same params, whose output matches diffusers' float64 output."""
    script = _peers()
    import torch

    model = script.build_unet({**script.TINY_UNET, "layers_per_block": 2}, seed=1)
    for weights in ("bin", "safetensors"):
        script.save_release(model, script.CIFAR10_SCHEDULER, tmp_path / weights, safetensors=weights == "safetensors")
    path = tmp_path / "bin" / "diffusion_pytorch_model.bin"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = torch.load(path, weights_only=True)
    renamed = {functools.reduce(lambda k, kv: k.replace(f".{kv[0]}.", f".{kv[1]}."), old.items(), k): v
               for k, v in state.items()}
    assert any(".query." in k for k in renamed)
    torch.save(renamed, path)
    config, from_bin = pretrained.load(str(tmp_path / "bin"), dataset="celeb_a")
    _, from_safetensors = pretrained.load(str(tmp_path / "safetensors"), dataset="celeb_a")
    for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_safetensors)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x, t = script.fixture_inputs(script.TINY_UNET, 1000, seed=1)
    err = _relative_error(_eps(config, from_bin, x, t), script.reference_eps(model, x, t))
    print(f"fresh model (.bin): max relative error {err}")
    assert err.max() <= TOLERANCE


def test_released_cifar10_structure_converts_completely():
    """diffusers' UNet2DModel built from google/ddpm-cifar10-32's config (random weights): every key maps
    onto our 35.7M-parameter UNet, none is left over."""
    _peers()
    from diffusers import UNet2DModel

    torch_model = UNet2DModel(**{k: v for k, v in CIFAR10_UNET.items() if not k.startswith("_")})
    config = pretrained.make_config(pretrained.unet_fields(CIFAR10_UNET),
                                    pretrained.diffusion_fields(CIFAR10_SCHEDULER), "cifar10")
    target = jax.eval_shape(lambda: build_model(config).init(
        jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), np.zeros((1,), np.int32), train=False))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = pretrained.convert_weights(state, target["params"])
    assert count_params(params) == sum(p.numel() for p in torch_model.parameters()) == 35_746_307


SCHEDULERS = [
    {},  # diffusers' defaults: linear 1e-4 .. 0.02, T = 1000
    CIFAR10_SCHEDULER,
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000},
    {"beta_schedule": "sigmoid", "beta_start": 0.0001, "beta_end": 0.03, "num_train_timesteps": 500},
    {"trained_betas": list(np.linspace(0.001, 0.05, 200)), "num_train_timesteps": 200},
]


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=lambda s: s.get("beta_schedule", "trained" if s else "default"))
def test_schedule_equals_ddpm_scheduler(scheduler):
    _peers()
    from diffusers import DDPMScheduler

    fields = pretrained.diffusion_fields(scheduler)
    betas = schedules.SCHEDULES[fields["schedule"]](fields["num_timesteps"], **fields["schedule_kwargs"])
    theirs = DDPMScheduler(**{k: v for k, v in scheduler.items() if not k.startswith("_")})
    their_betas = theirs.betas.double().numpy()  # built in float32 by diffusers
    beta_err = np.abs(betas - their_betas).max()
    # ᾱ of their β's, in float64 (the recipe); their own ᾱ is a float32 cumprod, off by its rounding.
    ac_err = np.abs(np.cumprod(1.0 - betas) - np.cumprod(1.0 - their_betas)).max()
    ac_err_f32 = np.abs(np.cumprod(1.0 - betas) - theirs.alphas_cumprod.double().numpy()).max()
    print(f"{scheduler.get('beta_schedule')}: max |Δβ| {beta_err:.2e}, max |Δᾱ| {ac_err:.2e} "
          f"(vs their float32 ᾱ {ac_err_f32:.2e})")
    assert beta_err <= 1e-7 and ac_err <= 1e-7 and ac_err_f32 <= 1e-6


def test_cli_pretrained_flag_converts_once_and_samples(tmp_path):
    """--pretrained writes the release as checkpoint step 0, then --mode=sample runs on it; a second call reuses it."""
    import subprocess

    root = pathlib.Path(__file__).parents[1]
    command = [sys.executable, "-m", "ddpm_jax.main", f"--pretrained={FIXTURE}", "--pretrained_dataset=celeb_a",
               f"--workdir={tmp_path}",
               "--mode=sample", f"--config={root / 'experiments' / 'configs' / 'tiny.py'}",
               "--config.sampling.num_steps=3", "--config.sampling.batch=2"]
    for attempt in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "samples of step 0" in result.stdout
    assert "is not converted again" in result.stderr
    samples = np.load(tmp_path / "samples" / "ema_00000000.npz")["samples"]
    assert samples.shape == (2, 16, 16, 3) and np.all(np.isfinite(samples))
    restored = checkpoints.load_ema_params(str(tmp_path))
    _, params = _fixture()
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # ~25-50 s on 2 cores; test_cli_pretrained_flag_converts_once_and_samples stays in the default suite
def test_every_mode_runs_on_a_loaded_release(tmp_path):
    """--pretrained then --mode=eval (the bound on the digits test split), the σ ablation on the converted
    checkpoint, and fine-tuning that resumes from the release's step 0; tests/fixtures/pretrained_digits is a
    random diffusers UNet at the digits' 8×8×1 (scripts/make_pretrained_fixture.py --layout=digits)."""
    import subprocess

    root = pathlib.Path(__file__).parents[1]
    release = root / "tests" / "fixtures" / "pretrained_digits"
    common = [f"--pretrained={release}", "--pretrained_dataset=digits", f"--workdir={tmp_path}"]
    configs = root / "experiments" / "configs"
    result = subprocess.run([sys.executable, "-m", "ddpm_jax.main", *common, "--mode=eval",
                             f"--config={configs / 'tiny.py'}", "--config.eval.num_steps=4",
                             "--config.eval.batch_size=32"], capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    bound = json.loads(result.stdout.strip().splitlines()[-1])
    assert bound["step"] == 0 and bound["num_steps"] == 4 and bound["num_examples"] == 32
    assert 0.0 < bound["bpd"] < 1e4 and bound["bpd_stderr"] > 0.0  # a random network: a large but finite bound

    result = subprocess.run([sys.executable, "-m", "experiments.sigma_ablation", *common,
                             f"--config={configs / 'ablation_tiny.py'}", "--config.spacings=('even',)",
                             "--config.num_steps=(2,)", "--config.seeds=(0,)", "--config.variances=('fixed_large',)",
                             "--config.reference=fixed_large", f"--config.output_dir={tmp_path / 'ablation'}"],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "ablation" / "results.md").read_text(encoding="utf-8")
    assert "| fixed_large | 2 |" in table and "| ddim_eta0 [1] | 2 |" in table

    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["config"]
    assert config["model"]["ch"] == 8 and config["data"]["dataset"] == "digits"
    loaded, params = pretrained.load(str(release), dataset="digits")
    restored = checkpoints.load_ema_params(str(tmp_path))
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Fine-tuning: training resumes from the converted step 0 with the release's own config.
    from ddpm_jax import train

    loaded.training.num_train_steps, loaded.training.batch_size = 2, 8
    loaded.training.save_every, loaded.training.log_every, loaded.training.sample_every = 2, 1, 0
    state = train.train_and_evaluate(loaded, str(tmp_path), allow_config_change=True)
    assert int(np.asarray(state.step.addressable_data(0))) == 2
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(train.local_copy(state.params)), jax.tree.leaves(params))]
    assert any(moved)
