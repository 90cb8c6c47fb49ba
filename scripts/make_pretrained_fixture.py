"""Writes tests/fixtures/pretrained_tiny/: a tiny diffusers DDPM in the released layout, with reference outputs.

  python scripts/make_pretrained_fixture.py [--out=tests/fixtures/pretrained_tiny]
  python scripts/make_pretrained_fixture.py --layout=digits   # tests/fixtures/pretrained_digits

The UNet has google/ddpm-cifar10-32's structure shrunk: the same block types
(attention only at the second of its levels, so neither at the full
resolution nor at the lowest), the same single-head attention, padding, timestep
embedding and GroupNorm epsilon, with block_out_channels (8, 16, 16) instead
of (128, 256, 256, 256), 4 GroupNorm groups (of 2 and 4 channels) instead of
32, and 1 layer per block instead of 2: 71,323 parameters, 334 KiB. Every weight is
non-zero: diffusers' random init plus noise, so zero-initialised biases and the
GroupNorm (1, 0) scale/bias cannot hide a wrong mapping. The scheduler config is
the one of google/ddpm-cifar10-32. reference.npz holds inputs x [4, 16, 16, 3]
(NHWC), t = (0, 1, T/2, T−1) and diffusers' output ε for them, computed in float64.

Needs torch and diffusers (pip install -e ".[peers]"); tests/test_pretrained.py
imports the builders below for its own fresh models.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

TINY_UNET = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, norm_eps=1e-6, attention_head_dim=None, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, act_fn="silu", time_embedding_type="positional")

# The same structure at the offline digits' shape (8×8×1), for running every mode on a loaded release
# without a download: tests/fixtures/pretrained_digits (--layout=digits; no reference outputs needed there).
DIGITS_UNET = dict(TINY_UNET, sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))

# google/ddpm-cifar10-32's scheduler_config.json (DDPMScheduler, Ho et al. §4).
CIFAR10_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                         variance_type="fixed_large", clip_sample=True, trained_betas=None)


def build_unet(config: dict, seed: int):
    """A diffusers UNet2DModel (float32) with every parameter perturbed away from its init."""
    import torch  # pylint: disable=import-outside-toplevel
    from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel

    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * max(float(p.std()) if p.numel() > 1 else 0.0, 0.1))
    return model


def save_release(model, scheduler_config: dict, directory: pathlib.Path, *, safetensors: bool = True) -> None:
    """config.json + diffusion_pytorch_model.{safetensors,bin} + scheduler_config.json, as on the hub."""
    from diffusers import DDPMScheduler  # pylint: disable=import-outside-toplevel

    model.save_pretrained(str(directory), safe_serialization=safetensors)
    DDPMScheduler(**scheduler_config).save_pretrained(str(directory))


def reference_eps(model, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
    """diffusers' UNet output for x [B, H, W, C] at steps t [B], in float64, as [B, H, W, C]."""
    import copy  # pylint: disable=import-outside-toplevel

    import torch  # pylint: disable=import-outside-toplevel

    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        out = model64(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).astype(np.float64)),
                      torch.from_numpy(t.astype(np.int64))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def fixture_inputs(config: dict, num_timesteps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, I) [4, S, S, C] float32 and t = (0, 1, T/2, T−1)."""
    size = config["sample_size"]
    x = np.random.default_rng(seed).standard_normal((4, size, size, config["in_channels"])).astype(np.float32)
    t = np.array([0, 1, num_timesteps // 2, num_timesteps - 1], dtype=np.int32)
    return x, t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pretrained_tiny"
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--layout", choices=("cifar10", "digits"), default="cifar10")
    args = parser.parse_args()
    if args.layout == "digits":
        out = args.out or default.with_name("pretrained_digits")
        out.mkdir(parents=True, exist_ok=True)
        save_release(build_unet(DIGITS_UNET, seed=3), CIFAR10_SCHEDULER, out)
        print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")
        return
    args.out = args.out or default
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_unet(TINY_UNET, seed=0)
    save_release(model, CIFAR10_SCHEDULER, args.out)
    x, t = fixture_inputs(TINY_UNET, CIFAR10_SCHEDULER["num_train_timesteps"], seed=0)
    np.savez(args.out / "reference.npz", x=x, t=t, eps=reference_eps(model, x, t))
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}: {total / 1024:.0f} KiB, "
          f"{sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
