"""The peer of the benchmarks: the same UNet in PyTorch + diffusers (`pip install -e ".[peers]"`).

`diffusers.UNet2DModel` configured to be Ho et al.'s UNet as `ddpm_jax.models.UNet` builds
it (the configuration of google/ddpm-cifar10-32): the same blocks per level, a single
attention head at the same resolutions, GroupNorm ε = 1e-6, the tensor2tensor sinusoid
(flip_sin_to_cos=False, freq_shift=1), a 2-layer time MLP of width 4·ch. `build_unet`
asserts that it has exactly as many parameters as ours. Used by scripts/bench_train.py
and scripts/bench_sampling.py with --peer; torch and diffusers are imported only here.
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
import types

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
except ImportError:  # environment() and write_record() still work
    torch = None


def processor() -> str:
    """The CPU's "model name" from /proc/cpuinfo (platform.processor() elsewhere), read, never typed."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor() or "unknown"


def environment() -> dict:
    """Machine, versions and date for a results file."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "processor": processor(), "cpus_visible": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "peer_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "ddpm_jax_malloc": _ddpm_jax_malloc(), "peer_malloc": "glibc default" if PEER_MALLOC == "system" else "tuned"}


def _ddpm_jax_malloc() -> str:
    from ddpm_jax.utils import runtime
    return "tuned (ddpm_jax.utils.runtime.MALLOC_SETTINGS)" if runtime.malloc_tuned else "glibc default"


def ratio_summary(ours: list[list[float]], peer: list[list[float]]) -> dict:
    """Per round: median of our step times ÷ median of the peer's; the min and median over rounds."""
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(ours, peer)]
    flat = lambda rounds: [s for r in rounds for s in r]
    return {"ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratios": ratios,
            "ours_min_s": min(flat(ours)), "ours_median_s": statistics.median(flat(ours)),
            "peer_min_s": min(flat(peer)), "peer_median_s": statistics.median(flat(peer))}


def write_record(stem: pathlib.Path, title: str, command: str, info: dict, rows: list[dict],
                 columns: list[tuple[str, str, str]], notes: list[str]) -> None:
    """stem.json (everything) and stem.md (the environment, a table of `columns` = (key, header, format), notes)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"command": command, **info, "rows": rows}, indent=1) + "\n")
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for key, _, fmt in columns) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines + [""] + notes) + "\n")


def build_unet(model_config, image_size: int, in_channels: int, out_channels: int, dropout: float,
               expected_params: int) -> UNet2DModel:
    """diffusers' UNet2DModel with our UNet's architecture; raises if the parameter counts differ."""
    levels = len(model_config.ch_mult)
    attn = [image_size // 2 ** level in model_config.attn_resolutions for level in range(levels)]
    channels = tuple(model_config.ch * m for m in model_config.ch_mult)
    # One head: attention_head_dim = the channels where attention runs (the down levels and the middle).
    heads_dim = channels[attn.index(True)] if any(attn) else channels[-1]
    if any(c != heads_dim for c, a in zip(channels, attn) if a) or channels[-1] != heads_dim:
        raise ValueError("the peer supports attention at levels of one channel count only")
    unet = UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=channels, layers_per_block=model_config.num_res_blocks,
        norm_num_groups=model_config.num_groups, norm_eps=1e-6, act_fn="silu",
        attention_head_dim=heads_dim, time_embedding_type="positional", flip_sin_to_cos=False,
        freq_shift=1, dropout=dropout, resnet_time_scale_shift="default")
    count = sum(p.numel() for p in unet.parameters())
    if count != expected_params:
        raise AssertionError(f"diffusers UNet has {count:,} parameters, ddpm_jax's {expected_params:,}")
    return unet


class TrainStep:
    """Ho Algorithm 1 as ddpm_jax's train step does it: q_sample, ε-MSE, backward, clip 1.0, Adam, EMA."""

    def __init__(self, unet: UNet2DModel, alphas_cumprod: np.ndarray, lr: float, grad_clip: float,
                 ema_decay: float):
        self.unet = unet.train()
        self.ema = copy.deepcopy(unet).eval().requires_grad_(False)
        self.params = [p for p in unet.parameters()]
        self.ema_params = list(self.ema.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=lr, foreach=True)
        self.sqrt_ac = torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32)
        self.sqrt_1m_ac = torch.tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32)
        self.grad_clip, self.ema_decay = grad_clip, ema_decay

    def __call__(self, x0: torch.Tensor) -> float:
        t = torch.randint(0, len(self.sqrt_ac), (x0.shape[0],))
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(self.unet(x_t, t).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_decay)
        return loss.detach().item()


def sampler(unet: UNet2DModel, betas: np.ndarray, num_steps: int, shape: tuple[int, ...], seed: int = 0):
    """A function running diffusers' DDPMScheduler ancestral loop over `num_steps` respaced steps."""
    scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(),
                              variance_type="fixed_small", clip_sample=False, timestep_spacing="linspace")
    scheduler.set_timesteps(num_steps)
    unet = unet.eval()
    generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        x = torch.randn(shape, generator=generator)
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x

    return run


def serve(conn, kind: str, spec: dict) -> None:
    """Child-process loop: build the peer for `spec`, then answer each n received with n timings.

    kind "train": n train steps, a list of seconds; kind "sample": n chains of spec["num_steps"] steps;
    kind "grad": n forward + backward passes of the UNet's L_simple, no optimizer; kind "conv": n runs of
    one 3×3 convolution's spec["part"] ("forward", "input_grad" or "kernel_grad") at spec["shape"]
    (N, H, C_in, C_out). None ends the loop. A separate process keeps torch's threads from contending with XLA's.
    """
    torch.manual_seed(0)
    if kind == "conv":
        _serve_timings(conn, conv_part(spec["part"], *spec["shape"]))
        return
    unet = build_unet(types.SimpleNamespace(**spec["model"]), spec["image_size"], spec["channels"], spec["out_channels"],
                      spec["dropout"], spec["expected_params"])
    shape = (spec["batch"], spec["channels"], spec["image_size"], spec["image_size"])
    if kind == "train":
        step = TrainStep(unet, np.asarray(spec["alphas_cumprod"]), spec["lr"], spec["grad_clip"], spec["ema_decay"])
        x0 = torch.rand(shape) * 2 - 1
        fn = lambda: step(x0)
    elif kind == "grad":
        fn = grad_pass(unet.train(), torch.rand(shape) * 2 - 1, len(spec["alphas_cumprod"]))
    else:
        fn = sampler(unet, np.asarray(spec["betas"]), spec["num_steps"], shape)
    _serve_timings(conn, fn)


def grad_pass(unet: UNet2DModel, x_t: torch.Tensor, num_timesteps: int):
    """One forward + backward of ‖ε − ε_θ(x_t, t)‖² (the cost of the network alone, without the optimizer)."""
    t = torch.randint(0, num_timesteps, (x_t.shape[0],))
    noise = torch.randn_like(x_t)

    def run() -> None:
        unet.zero_grad(set_to_none=True)
        F.mse_loss(unet(x_t, t).sample, noise).backward()

    return run


def conv_part(part: str, n: int, size: int, c_in: int, c_out: int):
    """One part of a 3×3, padding-1 convolution in NCHW, as torch runs it in a training step."""
    x = torch.randn(n, c_in, size, size)
    w = torch.randn(c_out, c_in, 3, 3) * 0.05
    g = torch.randn(n, c_out, size, size)
    parts = {"forward": lambda: F.conv2d(x, w, padding=1),
             "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1),
             "kernel_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1)}
    run = parts[part]
    return lambda: torch.no_grad()(run)()


def _serve_timings(conn, fn) -> None:
    """Warm `fn` up, say ready, then answer each n received with n wall-clock timings of fn()."""
    fn()  # warm-up
    conn.send("ready")
    while (n := conn.recv()) is not None:
        seconds = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        conn.send(seconds)


# The peer's DDPM_JAX_MALLOC: "system" (glibc's default, as PyTorch runs out of the box; the default) or
# "tuned" (the settings ddpm_jax makes for XLA:CPU, ddpm_jax.utils.runtime.tune_malloc_for_xla_cpu). The spawned
# child imports the benchmark script, hence ddpm_jax, which would tune it unless told not to.
PEER_MALLOC = "system"


class PeerProcess:
    """`serve` in a spawned child process; `time(n)` returns its n timings."""

    def __init__(self, kind: str, spec: dict):
        import multiprocessing
        # Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs
        # spinning made the torch step 6x slower (digits, load ~6 on 2 cores: 2.0 s vs 0.31 s).
        # The child inherits the environment at spawn; the user's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, kind, spec), daemon=True)
        saved = os.environ.get("DDPM_JAX_MALLOC")
        os.environ["DDPM_JAX_MALLOC"] = PEER_MALLOC
        try:
            self.process.start()
        finally:
            if saved is None:
                del os.environ["DDPM_JAX_MALLOC"]
            else:
                os.environ["DDPM_JAX_MALLOC"] = saved
        if self.conn.recv() != "ready":
            raise RuntimeError("the peer process did not start")

    def time(self, n: int) -> list[float]:
        self.conn.send(n)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=30)
