"""Training throughput: images/s and achieved FLOP/s of the train step, fp32 and bf16.

  python scripts/bench_train.py [--configs=cifar10,digits] [--batch_cifar10=8 --steps=3]
  python scripts/bench_train.py --configs=digits --precisions=fp32 --allreduce=pmean,ordered --tag=allreduce
  python scripts/bench_train.py --peer [--configs=digits,cifar10 --rounds=6 --steps=3]
  python scripts/bench_train.py --startup [--rounds=2]   # cold vs warm start (compilation cache)

--peer times the same step side by side with the same UNet in PyTorch + diffusers
(`pip install -e ".[peers]"`, scripts/peers.py): the two sides alternate, `--steps`
steps each per round, and each round gives one ratio ddpm_jax ÷ diffusers of the
median step times; the table gives the min and the median over rounds. The peer runs
in a child process: in one process torch's and XLA's thread pools contend (measured:
the torch step 10x slower after XLA had run). Writes
benchmarks/results/bench_train_peer_<backend>.{md,json}.

For each config the jitted data-parallel step (`train.parallel_train_step`,
all local devices) is compiled once; its FLOPs per step come from XLA's cost
analysis of the compiled program (`.compile().cost_analysis()['flops']`, per
device, times the device count); the step is then timed over --steps steps after
one warm-up step. The weights are random normal of the right shapes: the values
do not change the cost. Writes benchmarks/results/bench_train_<backend>.{md,csv}
with the machine and date (…_<backend>_<tag> with --tag). On CPU the CIFAR-10
model runs at a small batch. --allreduce compares the gradient mean of
`train.mean_over_devices`: 'pmean' (the default all-reduce) and 'ordered'
(training.ordered_allreduce: all-gather + sum in device order).

Reference: Ho et al. 2020 (Appendix B) train the CIFAR-10 model at 21 steps/s
with batch 128 on a TPU v3-8, i.e. 2688 images/s.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ddpm_jax import from_config, train  # noqa: E402
from ddpm_jax.models import count_params  # noqa: E402
REFERENCE = "Ho et al. 2020: CIFAR-10, batch 128, TPU v3-8: 21 steps/s = 2688 images/s"


def load_config(name: str):
    return from_config.load_config_file(ROOT / "experiments" / "configs" / f"{name}.py")


def random_state(config, mesh, seed: int = 0) -> train.TrainState:
    """A TrainState of the config's shapes with N(0, 0.02²) weights and zero Adam moments, replicated.

    Zero moments keep the loss finite (normal draws for Adam's second moment made it NaN).
    """
    abstract = jax.eval_shape(functools.partial(train.create_train_state, config), jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    fill = lambda x: (rng.normal(0.0, 0.02, x.shape) if np.issubdtype(x.dtype, np.floating)
                      else np.zeros(x.shape)).astype(x.dtype)
    zeros = lambda x: np.zeros(x.shape, x.dtype)
    state = jax.tree.map(fill, abstract).replace(opt_state=jax.tree.map(zeros, abstract.opt_state))
    return train.replicate(state, mesh)


def time_calls(fn: Callable[[], None], n: int) -> list[float]:
    """Wall seconds of each of n calls of fn (which must block until its result is ready)."""
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def side_by_side(ours: Callable[[], None], peer_kind: str, peer_spec: dict, rounds: int, repeats: int) -> dict:
    """ours() against the PyTorch peer `peer_kind` (scripts/peers.py, a child process), alternating
    `repeats` calls each for `rounds` rounds after one warm-up call of ours: peers.ratio_summary of the
    wall times, with the 1-minute load average's range over the rounds."""
    import peers  # torch and diffusers: only side by side
    ours()  # compile and warm up
    peer = peers.PeerProcess(peer_kind, peer_spec)
    ours_times, peer_times, loads = [], [], []
    try:
        for _ in range(rounds):
            ours_times.append(time_calls(ours, repeats))
            peer_times.append(peer.time(repeats))
            loads.append(os.getloadavg()[0])
    finally:
        peer.close()
    return {**peers.ratio_summary(ours_times, peer_times), "load_min": min(loads), "load_max": max(loads)}


class JaxStep:
    """The compiled data-parallel train step of a config, on random weights and images, ready to time."""

    def __init__(self, config):
        self.mesh = train.make_mesh(jax.local_devices())
        self.state = random_state(config, self.mesh)
        self.schedule = train.replicate(from_config.build_schedule(config), self.mesh)
        self.rng = train.replicate(jax.random.PRNGKey(1), self.mesh)
        h, w, c = from_config.image_shape(config)
        batch = config.training.batch_size
        self.images = train.shard_batch(
            np.random.default_rng(1).uniform(-1, 1, (batch, h, w, c)).astype(np.float32), self.mesh)
        start = time.perf_counter()
        self.compiled = train.parallel_train_step.lower(self.state, self.images, self.rng, self.schedule,
                                                        hyper=train.step_config(config), mesh=self.mesh).compile()
        self.compile_s = time.perf_counter() - start
        self.metrics = None

    def flops(self) -> float:
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) * self.mesh.size

    def __call__(self) -> None:
        self.state, self.metrics = self.compiled(self.state, self.images, self.rng, self.schedule)
        jax.block_until_ready(self.metrics)

    def time_steps(self, steps: int) -> list[float]:
        return time_calls(self, steps)


def bench(name: str, batch_size: int, bf16: bool, steps: int, ordered: bool = False) -> dict:
    config = load_config(name)
    config.training.batch_size = batch_size
    config.training.bf16 = bf16
    config.training.ordered_allreduce = ordered
    step = JaxStep(config)
    compile_s, flops, mesh = step.compile_s, step.flops(), step.mesh
    step()  # warm-up
    seconds = sum(step.time_steps(steps)) / steps
    state = step.state
    return {"config": name, "precision": "bf16" if bf16 else "fp32",
            "params_M": round(count_params(state.params) / 1e6, 2),
            "batch": batch_size, "devices": mesh.size, "allreduce": "ordered" if ordered else "pmean",
            "steps_per_s": round(1 / seconds, 3),
            "images_per_s": round(batch_size / seconds, 1), "gflops_per_step": round(flops / 1e9, 2),
            "achieved_tflops": round(flops / seconds / 1e12, 4), "compile_s": round(compile_s, 1)}


def machine() -> str:
    device = jax.devices()[0]
    return (f"{platform.node()} | {platform.platform()} | {os.cpu_count()} CPU threads (1-min load average "
            f"{os.getloadavg()[0]:.1f} when written: other jobs share them) | backend {device.platform} | "
            f"{jax.device_count()} x {device.device_kind} | jax {jax.__version__}")


def write(rows: list[dict], backend: str, note: str, tag: str = "") -> pathlib.Path:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_train_{backend}{'_' + tag if tag else ''}"
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    table = header + "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n" for row in rows)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"# Train-step throughput ({backend})\n\nProduced by `scripts/bench_train.py` on {date}.\n\n"
            f"Machine: {machine()}\n\n{note}\n\n{table}\nReference: {REFERENCE}.\n")
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    return stem.with_suffix(".md")


def peer_spec(config, expected_params: int) -> dict:
    """What the peer process needs to build the same UNet and step (plain data: it is pickled)."""
    h, w, c = from_config.image_shape(config)
    schedule = from_config.build_schedule(config)
    model = {key: config.model[key] for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_groups")}
    return {"model": model, "image_size": h, "channels": c, "out_channels": from_config.out_channels(config),
            "dropout": config.training.dropout, "expected_params": expected_params,
            "batch": config.training.batch_size, "alphas_cumprod": np.asarray(schedule.alphas_cumprod, np.float64),
            "lr": config.training.lr, "grad_clip": config.training.grad_clip,
            "ema_decay": config.training.ema_decay}


def bench_peer(name: str, batch_size: int, rounds: int, steps: int) -> dict:
    """ddpm_jax's step and the diffusers peer's, alternating `steps` steps each for `rounds` rounds."""
    config = load_config(name)
    config.training.batch_size = batch_size
    ours = JaxStep(config)
    num_params = count_params(ours.state.params)
    summary = side_by_side(ours, "train", peer_spec(config, num_params), rounds, steps)
    return {"config": name, "params": num_params, "batch": batch_size, "rounds": rounds, "steps_per_round": steps,
            **summary, "compile_s": ours.compile_s, "loss": float(ours.metrics["loss"])}


PEER_COLUMNS = [("config", "config", "{}"), ("params", "parameters", "{:,}"), ("batch", "batch", "{}"),
                ("rounds", "rounds × steps", "{}"), ("ours_median_s", "ddpm_jax step (s), median", "{:.3f}"),
                ("ours_min_s", "min", "{:.3f}"), ("peer_median_s", "diffusers step (s), median", "{:.3f}"),
                ("peer_min_s", "min", "{:.3f}"), ("ratio_min", "ratio ddpm_jax ÷ diffusers, min", "{:.2f}"),
                ("ratio_median", "median", "{:.2f}"), ("load_min", "load (1 min) from", "{:.1f}"),
                ("load_max", "to", "{:.1f}")]


def main_peer(args, backend: str) -> None:
    import peers
    steps = args.steps or 3
    rows = []
    for name in args.configs.split(","):
        batch = load_config(name).training.batch_size
        if name == "cifar10":
            batch = args.batch_cifar10 or (8 if backend == "cpu" else batch)
        rows.append(bench_peer(name, batch, args.rounds, steps))
        rows[-1]["rounds"] = f"{args.rounds} × {steps}"
        print(" | ".join(f"{k}={v}" for k, v in rows[-1].items() if k != "ratios"), flush=True)
    stem = ROOT / "benchmarks" / "results" / f"bench_train_peer_{backend}{'_' + args.tag if args.tag else ''}"
    notes = [f"One round: {steps} ddpm_jax steps (`train.parallel_train_step`: per-example noise and t, the UNet "
             f"under vmap, L_simple, grad clip 1.0, Adam, EMA), then {steps} steps of the same UNet in diffusers "
             "(`scripts/peers.py`: the same ops in PyTorch, Adam(foreach), in a child process). The ratio of each "
             "round is ddpm_jax's median step ÷ the peer's; min and median over rounds. Wall-clock seconds; "
             "the machine is shared, so read the ratios (both sides see the same load) and the load column.",
             args.note]
    info = peers.environment() | {"backend": backend, "devices": jax.device_count()}
    peers.write_record(stem, f"Train step: ddpm_jax vs PyTorch + diffusers ({backend})",
                       "python " + " ".join(sys.argv), info, rows, PEER_COLUMNS, notes)
    print(f"wrote {stem}.md")


def startup_run(cache_dir: str, workdir: str) -> float:
    """Wall seconds of `python -m ddpm_jax.main` training the digits config for one step, in a fresh process."""
    env = dict(os.environ, DDPM_JAX_COMPILATION_CACHE=cache_dir)
    command = [sys.executable, "-m", "ddpm_jax.main", f"--config={ROOT / 'experiments/configs/digits.py'}",
               f"--workdir={workdir}", "--config.training.num_train_steps=1", "--config.training.sample_every=0"]
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main_startup(args) -> None:
    """Cold start (empty compilation cache), then warm starts (the cache the cold one filled), digits, 1 step."""
    import peers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "jax_cache")
        for i, kind in enumerate(["off", "cold"] + ["warm"] * args.rounds):
            seconds = startup_run("off" if kind == "off" else cache, os.path.join(tmp, f"run{i}"))
            files = list(pathlib.Path(cache).glob("*")) if os.path.isdir(cache) else []
            rows.append({"start": kind, "seconds": seconds, "cache_entries": len(files),
                         "cache_mib": sum(f.stat().st_size for f in files) / 2**20, "load": os.getloadavg()[0]})
            print(rows[-1], flush=True)
    stem = ROOT / "benchmarks" / "results" / "compilation_cache_cpu"
    notes = ["Each row is one `python -m ddpm_jax.main --config=experiments/configs/digits.py "
             "--config.training.num_train_steps=1 --config.training.sample_every=0` in a fresh process, timed from "
             "launch to exit (imports, data, init, compilation, the step, one checkpoint). 'off': "
             "DDPM_JAX_COMPILATION_CACHE=off; 'cold': an empty cache directory; 'warm': the directory the cold "
             "start filled. Cache entries/MiB: the directory after the run."]
    columns = [("start", "start", "{}"), ("seconds", "launch to exit (s)", "{:.1f}"),
               ("cache_entries", "cache entries", "{}"), ("cache_mib", "cache MiB", "{:.1f}"),
               ("load", "load (1 min)", "{:.1f}")]
    peers.write_record(stem, "Start-up with JAX's persistent compilation cache (cpu)", "python " + " ".join(sys.argv),
                       peers.environment(), rows, columns, notes)
    print(f"wrote {stem}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="cifar10,digits")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch_cifar10", type=int, default=None, help="default: 128, or 8 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 50, or 3 on CPU")
    parser.add_argument("--allreduce", default="pmean", help="comma-separated: pmean, ordered")
    parser.add_argument("--tag", default="", help="suffix of the output file name")
    parser.add_argument("--note", default="")
    parser.add_argument("--peer", action="store_true", help="time against PyTorch + diffusers, side by side")
    parser.add_argument("--rounds", type=int, default=6, help="--peer: alternations of the two sides")
    parser.add_argument("--peer_malloc", choices=("default", "tuned"), default="default",
                        help="--peer: the peer's glibc malloc, its default or ddpm_jax's settings (scripts/peers.py)")
    parser.add_argument("--startup", action="store_true", help="cold and warm start of digits training")
    args = parser.parse_args()
    reductions = args.allreduce.split(",")
    if not set(reductions) <= {"pmean", "ordered"}:
        parser.error(f"--allreduce must be pmean and/or ordered, got {args.allreduce!r}")
    if args.startup:
        main_startup(args)
        return
    backend = jax.default_backend()
    if args.peer:
        import peers
        peers.PEER_MALLOC = "system" if args.peer_malloc == "default" else "tuned"
        main_peer(args, backend)
        return
    on_cpu = backend == "cpu"
    steps = args.steps or (3 if on_cpu else 50)
    rows = []
    for name in args.configs.split(","):
        batch = load_config(name).training.batch_size
        if name == "cifar10":
            batch = args.batch_cifar10 or (8 if on_cpu else batch)
        for precision in args.precisions.split(","):
            for allreduce in reductions:
                row = bench(name, batch, precision == "bf16", steps, ordered=allreduce == "ordered")
                print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                rows.append(row)
    note = args.note or (f"Timed over {steps} steps after one warm-up step; FLOPs from XLA cost analysis of the "
                         "compiled step (forward + backward + Adam + EMA).")
    print(f"\nwrote {write(rows, backend, note, args.tag)}\n{REFERENCE}")


if __name__ == "__main__":
    main()
