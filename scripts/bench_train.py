"""Training throughput: images/s and achieved FLOP/s of the train step, fp32 and bf16.

  python scripts/bench_train.py [--configs=cifar10,digits] [--batch_cifar10=8 --steps=3]
  python scripts/bench_train.py --configs=digits --precisions=fp32 --allreduce=pmean,ordered --tag=allreduce

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
import importlib.util
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ddpm_jax import config_validation, train  # noqa: E402
from ddpm_jax.models import count_params  # noqa: E402
REFERENCE = "Ho et al. 2020: CIFAR-10, batch 128, TPU v3-8: 21 steps/s = 2688 images/s"


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "experiments" / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def random_state(config, mesh, seed: int = 0) -> train.TrainState:
    """A TrainState of the config's shapes with N(0, 0.02²) weights, replicated over the mesh."""
    abstract = jax.eval_shape(functools.partial(train.create_train_state, config), jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    fill = lambda x: (rng.normal(0.0, 0.02, x.shape) if np.issubdtype(x.dtype, np.floating)
                      else np.zeros(x.shape)).astype(x.dtype)
    return train.replicate(jax.tree.map(fill, abstract), mesh)


def bench(name: str, batch_size: int, bf16: bool, steps: int, ordered: bool = False) -> dict:
    config = load_config(name)
    config.training.batch_size = batch_size
    config.training.bf16 = bf16
    config.training.ordered_allreduce = ordered
    mesh = train.make_mesh(jax.local_devices())
    state = random_state(config, mesh)
    schedule = train.replicate(train.build_schedule(config), mesh)
    rng = train.replicate(jax.random.PRNGKey(1), mesh)
    h, w, c = config_validation.image_shape(config)
    images = train.shard_batch(np.random.default_rng(1).uniform(-1, 1, (batch_size, h, w, c)).astype(np.float32),
                               mesh)

    start = time.perf_counter()
    compiled = train.parallel_train_step.lower(state, images, rng, schedule, hyper=train.step_config(config),
                                               mesh=mesh).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) * mesh.size

    state, metrics = compiled(state, images, rng, schedule)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, images, rng, schedule)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="cifar10,digits")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch_cifar10", type=int, default=None, help="default: 128, or 8 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 50, or 3 on CPU")
    parser.add_argument("--allreduce", default="pmean", help="comma-separated: pmean, ordered")
    parser.add_argument("--tag", default="", help="suffix of the output file name")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    reductions = args.allreduce.split(",")
    if not set(reductions) <= {"pmean", "ordered"}:
        parser.error(f"--allreduce must be pmean and/or ordered, got {args.allreduce!r}")
    backend = jax.default_backend()
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
