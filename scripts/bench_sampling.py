"""Benchmark of ddpm_jax.sampling.sample (a benchmark, not a timed test).

For K = 10, 100, 1000 steps of a small UNet (or an MLP) it measures, in one run:
  (a) chain wall time ÷ (K × one jitted model call): the cost of the scan around the model
      (ideal 1.0; the step's noise, posterior arithmetic and x_T draw are the overhead);
  (b) the speed-up of the one-scan chain over a Python loop calling a jitted step function;
  (c) the compiled program's memory (memory_analysis(): temp and output bytes) against K,
      with and without the trajectory;
  (d) the overhead of progress=True (chunks of ⌈K/20⌉ steps and a tqdm bar) over progress=False;
  (a'), (d') those two overheads measured directly, as the chain's cost with a zero-cost model.
Times are medians of repeats after a warm-up (compile) run, with block_until_ready; wall and
process CPU time are both reported (on a machine loaded by others, read the CPU time).
Writes benchmarks/results/bench_sampling_<backend>.{md,csv} with the machine and date.

  python scripts/bench_sampling.py                  # UNet, K = 10,100,1000 (~4 min of CPU time)
  python scripts/bench_sampling.py --model mlp --ks 10,100
  python scripts/bench_sampling.py --peer [--full]  # vs PyTorch + diffusers, K = 10, 100 (1000 with --full)

--peer: the digits UNet (experiments/configs/digits.py, 701,345 parameters, random weights) sampling
a batch of 64 with ddpm_jax's one-`lax.scan` chain (ancestral, σ² = β̃) against the same UNet in
diffusers with DDPMScheduler's Python loop (scripts/peers.py, in a child process so the two thread
pools do not contend), one chain each in turn, --repeats rounds; the ratio of each round is
ddpm_jax ÷ diffusers, min and median over rounds. Writes benchmarks/results/bench_sampling_peer_<backend>.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ddpm_jax import sampling, schedules
from ddpm_jax.models.layers import get_timestep_embedding

try:
    from ddpm_jax.models import UNet
except ImportError:  # the benchmark still runs, on the MLP
    UNet = None

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
T = 1000


class MLP(nn.Module):
    """ε-network on flattened inputs: [x, sinusoidal(t)] → depth × Dense(width) → Dense(d)."""

    width: int = 1024
    depth: int = 4

    @nn.compact
    def __call__(self, x, t, *, train=False):
        h = jnp.concatenate([x.reshape(x.shape[0], -1), get_timestep_embedding(t, 64)], axis=-1)
        for _ in range(self.depth):
            h = nn.swish(nn.Dense(self.width)(h))
        return nn.Dense(int(np.prod(x.shape[1:])))(h).reshape(x.shape)


def build_model(args):
    """(apply(params, x, t), params, description); apply is one stable function so the chain compiles once."""
    shape = (args.batch, args.image_size, args.image_size, 1)
    if args.model == "unet":
        model = UNet(ch=args.ch, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                     out_channels=1, num_groups=8)
        desc = f"UNet(ch={args.ch}, ch_mult=(1, 2), num_res_blocks=1, no attention)"
    else:
        model = MLP()
        desc = f"MLP(width={MLP.width}, depth={MLP.depth})"
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32), train=False)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    def apply(params, x, t):
        return model.apply(params, x, t, train=False)

    return apply, params, f"{desc}, {num_params:,} params, x {list(shape)}"


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of fn() (which must block) over `repeats` runs.

    CPU time (all threads of this process) is reported beside wall time because the
    machine may be shared: other processes' load stretches wall time, not our CPU time.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def python_loop_sampler(apply, params, schedule, rng, shape, num_steps):
    """The same chain as `sample` (same keys, same step), one jitted step per Python iteration."""
    kept = schedules.space_timesteps(T, num_steps, "even")
    sub = schedule if num_steps == T else schedules.respace(schedule, kept)
    batch_ids = jnp.arange(shape[0])

    @jax.jit
    def step(params, sub, chain_key, x, i):
        output = apply(params, x, jnp.full(shape[:1], sub.timesteps[i], jnp.int32))
        z = sampling.example_noise(jax.random.fold_in(chain_key, i), batch_ids, shape[1:])
        return sampling.ancestral_step(sub, output, x, i, z, variance="fixed_small", mean_type="eps",
                                       clip_x0=False, gamma=None)

    def run():
        init_key, chain_key = jax.random.split(rng)
        x = sampling.example_noise(init_key, batch_ids, shape[1:])
        for i in reversed(range(num_steps)):
            x = step(params, sub, chain_key, x, np.int32(i))
        return x.block_until_ready()

    return run


def zero_model(x_t, t):
    """Costs nothing, so a chain with it times the sampler's own work (noise, posterior, loop, dispatch)."""
    return jnp.zeros_like(x_t)


def sampler_overheads(schedule, rng, shape, num_steps, repeats) -> tuple[float, float]:
    """(CPU µs per step of the chain itself, CPU µs per progress chunk), with the zero model.

    Short runs repeated many times, taking the minimum (the run least disturbed by other
    processes): a steadier estimate of the overheads in (a) and (d) than the differences of
    long runs of the real model on a loaded machine.
    """
    chain = lambda progress: sampling.sample(zero_model, schedule, rng, shape, num_steps=num_steps,
                                             progress=progress).block_until_ready()
    chain(False), chain(True)  # compile
    off, on = [], []
    for _ in range(repeats):
        off.append(timed(lambda: chain(False), 1)[1])
        on.append(timed(lambda: chain(True), 1)[1])
    num_chunks = math.ceil(num_steps / math.ceil(num_steps / sampling.PROGRESS_UPDATES))
    off, on = min(off), min(on)
    return 1e6 * off / num_steps, 1e6 * (on - off) / num_chunks


def compiled_memory(apply, schedule, params, shape, num_steps, trajectory) -> dict:
    """memory_analysis() of the whole sampler compiled as one program (x_T draw, scan, trajectory)."""
    fn = jax.jit(lambda params, rng: sampling.sample(Partial(apply, params), schedule, rng, shape,
                                                     num_steps=num_steps, return_trajectory=trajectory))
    stats = fn.lower(params, jax.random.key(0)).compile().memory_analysis()
    mib = lambda b: b / 2**20
    return dict(temp=mib(stats.temp_size_in_bytes), output=mib(stats.output_size_in_bytes),
                peak=mib(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                         - stats.alias_size_in_bytes))


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = jax.devices()[0]
    return {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "CPU": f"{cpu} ({os.cpu_count()} cores visible)",
        "backend / device kind": f"{jax.default_backend()} / {device.device_kind} × {jax.device_count()}",
        "versions": f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}",
        "load average at start (1 min)": f"{os.getloadavg()[0]:.1f}",
    }


def run(args) -> tuple[list[dict], dict]:
    apply, params, desc = build_model(args)
    shape = (args.batch, args.image_size, args.image_size, 1)
    schedule = schedules.get_schedule("linear", T)
    model_fn = Partial(apply, params)
    rng = jax.random.key(1)
    call_fn = jax.jit(apply)
    x, t = jnp.zeros(shape), jnp.full(shape[:1], 500, jnp.int32)
    model_call = lambda: call_fn(params, x, t).block_until_ready()
    model_call()  # compile
    info = machine_info() | {"model": desc, "schedule": f"linear, T = {T}; ancestral, σ² = β̃ (fixed_small)"}
    rows = []
    for num_steps in args.ks:
        repeats = args.repeats if num_steps < 1000 else args.repeats_1000
        chain = lambda progress: sampling.sample(model_fn, schedule, rng, shape, num_steps=num_steps,
                                                 progress=progress).block_until_ready()
        samples = np.asarray(chain(False))  # warm-up: compiles
        chain(True)
        loop = python_loop_sampler(apply, params, schedule, rng, shape, num_steps)
        loop_samples = np.asarray(loop())  # warm-up; also checks it is the same chain
        # Each repeat times the model call, the chain, the chain with progress and the loop back to
        # back, and the ratios are taken within a repeat: load drifts on a shared machine hit all alike.
        per_repeat = []
        for _ in range(repeats):
            call, chain_off, chain_on, looped = (timed(fn, n) for fn, n in (
                (model_call, args.call_repeats), (lambda: chain(False), 1), (lambda: chain(True), 1), (loop, 1)))
            per_repeat.append(dict(
                model_call_ms=1e3 * call[0], model_call_cpu_ms=1e3 * call[1], chain_s=chain_off[0],
                chain_cpu_s=chain_off[1], ratio=chain_off[0] / (num_steps * call[0]),
                ratio_cpu=chain_off[1] / (num_steps * call[1]), loop_s=looped[0], loop_cpu_s=looped[1],
                speedup=looped[0] / chain_off[0], speedup_cpu=looped[1] / chain_off[1],
                progress_s=chain_on[0], progress_overhead_pct=100.0 * (chain_on[0] / chain_off[0] - 1.0),
                progress_overhead_cpu_pct=100.0 * (chain_on[1] / chain_off[1] - 1.0)))
        step_us, chunk_us = sampler_overheads(schedule, rng, shape, num_steps, args.zero_repeats)
        mem = compiled_memory(apply, schedule, params, shape, num_steps, False)
        mem_traj = compiled_memory(apply, schedule, params, shape, num_steps, True)
        rows.append(dict(
            K=num_steps, repeats=repeats,
            **{key: statistics.median(r[key] for r in per_repeat) for key in per_repeat[0]},
            loop_max_abs_diff=float(np.max(np.abs(loop_samples - samples))),
            sampler_us_per_step=step_us, progress_us_per_chunk=chunk_us,
            temp_mib=mem["temp"], output_mib=mem["output"], peak_mib=mem["peak"],
            temp_mib_traj=mem_traj["temp"], output_mib_traj=mem_traj["output"], peak_mib_traj=mem_traj["peak"],
        ))
        print(format_row(rows[-1]), flush=True)
    info["load average at end (1 min)"] = f"{os.getloadavg()[0]:.1f}"
    return rows, info


COLUMNS = [  # (key, header, format)
    ("K", "K", "{}"), ("repeats", "repeats", "{}"), ("model_call_ms", "model call (ms)", "{:.2f}"), ("chain_s", "chain (s)", "{:.3f}"),
    ("ratio", "(a) chain ÷ (K·call)", "{:.3f}"), ("ratio_cpu", "(a) same, CPU time", "{:.3f}"),
    ("sampler_us_per_step", "(a') sampler µs/step", "{:.0f}"),
    ("loop_s", "Python loop (s)", "{:.3f}"), ("speedup", "(b) loop ÷ chain", "{:.3f}"),
    ("speedup_cpu", "(b) same, CPU time", "{:.3f}"),
    ("peak_mib", "(c) peak MiB", "{:.2f}"), ("temp_mib", "temp MiB", "{:.2f}"),
    ("peak_mib_traj", "peak MiB, trajectory", "{:.2f}"), ("output_mib_traj", "output MiB, trajectory", "{:.2f}"),
    ("progress_overhead_pct", "(d) progress overhead %", "{:+.1f}"),
    ("progress_overhead_cpu_pct", "(d) same, CPU time %", "{:+.1f}"),
    ("progress_us_per_chunk", "(d') progress µs/chunk", "{:.0f}"),
]


def format_row(row: dict) -> str:
    return " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS)


def progress_share(row: dict) -> float:
    """The progress bar's own CPU cost over the whole chain, in % of the chain's CPU time."""
    num_chunks = math.ceil(row["K"] / math.ceil(row["K"] / sampling.PROGRESS_UPDATES))
    return 100.0 * num_chunks * row["progress_us_per_chunk"] * 1e-6 / row["chain_cpu_s"]


def write_results(rows: list[dict], info: dict, stem: Path, command: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Sampler benchmark (`scripts/bench_sampling.py`)", "", f"Command: `{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + format_row(row) + " |" for row in rows]
    lines += ["", "(a) one `lax.scan` chain over K steps ÷ K jitted model calls (dispatch included in the call);",
              "(b) a Python loop of K jitted steps (same keys, same step function; max |Δ| of the samples: "
              + ", ".join(f"K={r['K']}: {r['loop_max_abs_diff']:.1e}" for r in rows) + ");",
              "(c) `memory_analysis()` of the whole sampler compiled as one program: argument + output + temp "
              "(MiB), without and with the [K+1, B, ...] trajectory;",
              "(d) progress=True (chunks of ⌈K/20⌉ steps, the next chunk queued before the bar waits) vs False.",
              "(a') and (d'): CPU µs per step of the chain and per progress chunk with a zero-cost model (minimum",
              "over many short runs): the sampler's own overheads, to set against the model call and the chain time:",
              "(a') ÷ model call = " + ", ".join(
                  f"K={r['K']}: {r['sampler_us_per_step'] / (10 * r['model_call_cpu_ms']):.1f}%" for r in rows)
              + "; (d') × chunks ÷ chain = " + ", ".join(
                  f"K={r['K']}: {progress_share(r):.2f}%" for r in rows) + ".",
              "Each repeat times the model call (median of several), the chain, the chain with progress and the",
              "loop back to back after a compile run; the table gives the medians over repeats of the times and of",
              "the within-repeat ratios. CPU time (all threads of the process) is given beside wall time because",
              "the machine may be shared: when the load average exceeds the core count, wall time measures the",
              "other processes as much as ours, and the CPU-time columns are the ones to read. Full columns in the CSV."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def run_peer(args) -> tuple[list[dict], dict]:
    """ddpm_jax's scan chain vs diffusers' DDPMScheduler loop on the digits UNet, alternating."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_train  # the side-by-side protocol of scripts/bench_train.py --peer
    import peers  # torch and diffusers: only with --peer
    from ddpm_jax import from_config
    config = from_config.load_config_file("digits.py")
    h, w, c = from_config.image_shape(config)
    shape = (config.sampling.batch, h, w, c)
    model = from_config.build_model(config)
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32), train=False)
    # Random weights as large as trained ones (the init zeroes every residual branch's last conv).
    params = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), params)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    schedule = from_config.build_schedule(config)
    model_fn = Partial(lambda p, x, t: model.apply(p, x, t, train=False), params)
    spec = {"model": {k: config.model[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                     "num_groups")},
            "image_size": h, "channels": c, "out_channels": c, "dropout": 0.0, "expected_params": num_params,
            "batch": shape[0], "betas": np.asarray(schedule.betas, np.float64)}
    rows, loads = [], []
    for num_steps in args.ks:
        chain = lambda: sampling.sample(model_fn, schedule, jax.random.key(1), shape, num_steps=num_steps,
                                        variance="fixed_small").block_until_ready()
        summary = bench_train.side_by_side(chain, "sample", spec | {"num_steps": num_steps}, args.repeats, 1)
        loads += [summary.pop("load_min"), summary.pop("load_max")]
        rows.append({"K": num_steps, "batch": shape[0], "params": num_params, "rounds": args.repeats, **summary})
        print(" | ".join(f"{k}={v}" for k, v in rows[-1].items() if k != "ratios"), flush=True)
    info = peers.environment() | {"backend": jax.default_backend(),
                                  "load_1min_during_run": f"{min(loads):.1f} to {max(loads):.1f}"}
    return rows, info


PEER_COLUMNS = [("K", "K", "{}"), ("batch", "batch", "{}"), ("params", "parameters", "{:,}"),
                ("rounds", "rounds", "{}"), ("ours_median_s", "ddpm_jax chain (s), median", "{:.3f}"),
                ("ours_min_s", "min", "{:.3f}"), ("peer_median_s", "diffusers loop (s), median", "{:.3f}"),
                ("peer_min_s", "min", "{:.3f}"), ("ratio_min", "ratio ddpm_jax ÷ diffusers, min", "{:.2f}"),
                ("ratio_median", "median", "{:.2f}")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("unet", "mlp"), default="unet" if UNet is not None else "mlp")
    parser.add_argument("--ch", type=int, default=16, help="UNet base channels")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")], default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per K < 1000")
    parser.add_argument("--repeats-1000", type=int, default=3, help="timed repeats for K >= 1000")
    parser.add_argument("--call-repeats", type=int, default=20)
    parser.add_argument("--zero-repeats", type=int, default=15, help="repeats of the zero-model chains")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/bench_sampling_<backend>)")
    parser.add_argument("--peer", action="store_true", help="against PyTorch + diffusers (digits UNet, batch 64)")
    parser.add_argument("--full", action="store_true", help="--peer: also K = 1000")
    args = parser.parse_args(argv)
    if args.peer:
        if args.ks == [10, 100, 1000]:  # the default: K = 1000 only with --full
            args.ks = [10, 100, 1000] if args.full else [10, 100]
        rows, info = run_peer(args)
        import peers
        stem = args.out or RESULTS / f"bench_sampling_peer_{jax.default_backend()}"
        notes = ["One round: one ddpm_jax chain (`sampling.sample`, one compiled `lax.scan`, ancestral with "
                 "σ² = β̃, linear β, T = 1000 respaced to K steps) then one diffusers chain (UNet2DModel + "
                 "DDPMScheduler.step in a Python loop, inference_mode, in a child process). Wall-clock seconds; "
                 "the ratio of each round is ddpm_jax ÷ diffusers; min and median over rounds."]
        peers.write_record(stem, f"Sampling: ddpm_jax vs PyTorch + diffusers ({jax.default_backend()})",
                           "python " + " ".join(sys.argv), info, rows, PEER_COLUMNS, notes)
        print(f"wrote {stem}.md")
        return
    stem = args.out or RESULTS / f"bench_sampling_{jax.default_backend()}"
    print(" | ".join(h for _, h, _ in COLUMNS))
    rows, info = run(args)
    write_results(rows, info, stem, "python " + " ".join(sys.argv))
    print(f"wrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
    main()
