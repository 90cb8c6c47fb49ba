"""Where the CPU train step's time goes, side by side with PyTorch: the UNet alone and its convolutions.

  python scripts/bench_parts.py [--configs=digits,cifar10 --rounds=4 --repeats=3]

Needs the peers extra (`pip install -e ".[peers]"`, scripts/peers.py). For each config it times
  - the UNet's forward + backward of L_simple alone (no optimizer, no EMA): ddpm_jax's jitted
    `jax.grad` of the batched model against diffusers' UNet2DModel `.backward()`;
  - the forward, input gradient and kernel gradient of one 3×3 convolution at the shapes that
    carry most of that UNet's convolution time (NHWC `lax.conv_general_dilated` and its VJPs
    against torch's NCHW `conv2d`, `conv2d_input`, `conv2d_weight`).
The two sides alternate, --repeats timings each per round, the peer in a child process (as in
bench_train.py --peer); each round gives ddpm_jax's median ÷ the peer's, min and median over
rounds. The train step's own ratio is `bench_train.py --peer`; the difference between the step
and the UNet alone is the update (clip, Adam, EMA). Writes benchmarks/results/bench_parts_peer_<backend>.{md,json}.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_train  # noqa: E402
from ddpm_jax import from_config, train  # noqa: E402
from ddpm_jax.models import count_params  # noqa: E402

# (N, H = W, C_in, C_out) of the stride-1 3×3 convolutions that dominate each UNet at its benchmark batch.
CONV_SHAPES = {"cifar10": [(8, 32, 128, 128), (8, 16, 256, 256), (8, 32, 256, 128), (8, 8, 256, 256)],
               "digits": [(128, 8, 32, 32), (128, 4, 64, 64), (128, 8, 64, 32)]}
CONV_PARTS = ("forward", "input_grad", "kernel_grad")
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def unet_grad_fn(config):
    """A no-argument function running one jitted forward + backward of L_simple for `config`'s UNet."""
    model = from_config.build_model(config)
    h, w, c = from_config.image_shape(config)
    batch = config.training.batch_size
    rng = np.random.default_rng(0)
    x_t = jnp.asarray(rng.uniform(-1, 1, (batch, h, w, c)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
    t = jnp.asarray(rng.integers(0, config.diffusion.num_timesteps, batch), jnp.int32)
    params = bench_train.random_state(config, train.make_mesh(jax.local_devices()[:1])).params
    key = jax.random.PRNGKey(0)

    def loss(p):
        out = model.apply({"params": p}, x_t, t, train=True, rngs={"dropout": key})
        return jnp.mean((out[..., :c] - noise) ** 2)

    grad = jax.jit(jax.grad(loss))
    return (lambda: jax.block_until_ready(grad(params))), count_params(params)


def conv_fn(part: str, n: int, size: int, c_in: int, c_out: int):
    """A no-argument function running one jitted part of a 3×3 'SAME' convolution in NHWC."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, size, size, c_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.normal(size=(n, size, size, c_out)), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMENSION_NUMBERS)
    fns = {"forward": lambda x, w, g: conv(x, w),
           "input_grad": lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
           "kernel_grad": lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]}
    jitted = jax.jit(fns[part])
    return lambda: jax.block_until_ready(jitted(x, w, g))


COLUMNS = [("config", "config", "{}"), ("what", "what", "{}"), ("shape", "shape (N, H, C_in, C_out) / batch", "{}"),
           ("ours_median_s", "ddpm_jax (ms), median", "{:.2f}"), ("peer_median_s", "PyTorch (ms), median", "{:.2f}"),
           ("ratio_min", "ratio, min", "{:.2f}"), ("ratio_median", "ratio, median", "{:.2f}"),
           ("load_min", "load from", "{:.1f}"), ("load_max", "to", "{:.1f}")]


def main() -> None:
    import peers
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="digits,cifar10")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_cifar10", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        config = bench_train.load_config(name)
        if name == "cifar10":
            config.training.batch_size = args.batch_cifar10
        fn, num_params = unet_grad_fn(config)
        spec = bench_train.peer_spec(config, num_params)
        rows.append({"config": name, "what": "UNet forward + backward", "shape": f"batch {spec['batch']}",
                     **bench_train.side_by_side(fn, "grad", spec, args.rounds, args.repeats)})
        print(rows[-1], flush=True)
        for shape in CONV_SHAPES.get(name, []):
            for part in CONV_PARTS:
                rows.append({"config": name, "what": f"3×3 conv {part}", "shape": str(shape),
                             **bench_train.side_by_side(conv_fn(part, *shape), "conv", {"part": part, "shape": shape},
                                            args.rounds, args.repeats)})
                print({k: v for k, v in rows[-1].items() if k != "ratios"}, flush=True)
    for row in rows:  # milliseconds in the table
        row["ours_median_s"] *= 1e3
        row["peer_median_s"] *= 1e3
    backend = jax.default_backend()
    stem = ROOT / "benchmarks" / "results" / f"bench_parts_peer_{backend}"
    notes = [f"One round: {args.repeats} calls of ddpm_jax's jitted function, then {args.repeats} of the PyTorch "
             "peer (child process); ratio = ddpm_jax's median ÷ the peer's per round, min and median over "
             f"{args.rounds} rounds. Wall-clock; the machine is shared (load columns). The UNet rows use dropout "
             "as configured and no optimizer; the train step with clip, Adam and EMA is bench_train.py --peer."]
    peers.write_record(stem, f"Parts of the train step: ddpm_jax vs PyTorch ({backend})",
                       "python " + " ".join(sys.argv), peers.environment() | {"backend": backend}, rows, COLUMNS, notes)
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
