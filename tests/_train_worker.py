"""One training process for the reliability tests, run as a subprocess (not a test module).

    python tests/_train_worker.py --config=experiments/configs/tiny.py --workdir=W \
        [--set training.num_train_steps=8 ...] [--nan_steps=3,4] \
        [--process_id=0 --num_processes=2 --coordinator=127.0.0.1:PORT] [--out=final.npz]

It calls `train.train_and_evaluate` the way `ddpm_jax.main` does, plus two test
hooks the CLI does not have:
  --nan_steps   replaces the images of those (zero-based) global steps by NaN, so
                the loss is non-finite there (a poisoned batch, end to end);
  --coordinator joins a multi-process run with jax.distributed.initialize on
                CPU devices connected by gloo.
The final state (params, ema_params, opt_state, step, counters) of this process
is written to --out as flat float/int arrays keyed by their tree path.
The device count comes from XLA_FLAGS, set by the caller before JAX starts.
"""

import argparse
import ast
import importlib.util
import sys

import jax
import numpy as np


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", action="append", default=[], help="dotted.field=python_literal")
    parser.add_argument("--nan_steps", default="")
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--out", default="")
    return parser.parse_args()


def _load_config(path: str, overrides: list[str]):
    spec = importlib.util.spec_from_file_location("worker_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        name, _, text = item.partition("=")
        *groups, field = name.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[field] = ast.literal_eval(text)
    return config


def _poison(get_dataset, nan_steps: set[int]):
    """get_dataset whose iterator yields NaN images at the global steps in nan_steps."""

    def poisoned(*args, start_step=0, **kwargs):
        def batches():
            for step, batch in enumerate(get_dataset(*args, start_step=start_step, **kwargs), start=start_step):
                if step in nan_steps:
                    batch = dict(batch, image=np.full_like(batch["image"], np.nan))
                yield batch

        return batches()

    return poisoned


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    # addressable_data(0): this process's copy of a replicated array.
    return {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0)) for path, leaf in leaves}


def main() -> int:
    args = _parse()
    jax.config.update("jax_platforms", "cpu")
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=60)
    from ddpm_jax import data, train  # pylint: disable=import-outside-toplevel

    if args.nan_steps:
        data.get_dataset = _poison(data.get_dataset, {int(s) for s in args.nan_steps.split(",")})
    config = _load_config(args.config, args.set)
    try:
        state = train.train_and_evaluate(config, args.workdir)
    except FloatingPointError as err:
        print(f"FloatingPointError: {err}", file=sys.stderr, flush=True)
        return 3
    if args.out:
        np.savez(args.out, **_flat(state))
    if args.coordinator:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
