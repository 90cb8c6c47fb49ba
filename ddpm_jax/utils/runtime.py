"""Process-wide JAX settings, in one place: XLA's CPU flags and the persistent compilation cache.

Both act only when set before JAX does the corresponding work: the flags before the
backend starts (XLA reads XLA_FLAGS once, when the first computation or device query
creates the backend), the cache before the first compilation. `ddpm_jax/__init__.py`
calls `set_default_xla_flags()` on import; entry points (ddpm_jax/main.py, the
experiment scripts) call `enable_compilation_cache()` first thing.
"""

from __future__ import annotations

import os
import pathlib

import jax
from absl import logging
from jax._src import xla_bridge

# XLA:CPU flags the project sets when the user has not set XLA_FLAGS. They name only the
# CPU compiler, so GPU/TPU programs are unaffected. Measured by scripts/bench_train.py
# (benchmarks/results/bench_train_flags_cpu.md, 2-core AMD EPYC, jax 0.10.2):
#   --xla_cpu_experimental_ynn_fusion_type=dot  hands matrix products to YNNPACK (XLA
#     already hands it convolutions and reductions); train step digits 0.73x, CIFAR-10 (batch 8)
#     0.xx of the default time. The numbers change at the level of float32 summation order.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_convolution",)

CACHE_ENV = "DDPM_JAX_COMPILATION_CACHE"


def set_default_xla_flags() -> bool:
    """Set XLA_FLAGS to CPU_XLA_FLAGS unless the user set XLA_FLAGS (even empty) or JAX already started.

    Returns whether the flags were set. JAX_PLATFORMS without 'cpu' (a GPU/TPU-only run) is left alone.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "XLA_FLAGS" in os.environ or xla_bridge.backends_are_initialized():
        return False
    if platforms and "cpu" not in platforms.split(","):
        return False
    os.environ["XLA_FLAGS"] = " ".join(CPU_XLA_FLAGS)
    return True


def default_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/ddpm_jax/jax_cache (~/.cache/ddpm_jax/jax_cache when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "ddpm_jax" / "jax_cache"


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache, so a program compiled once is loaded on later starts.

    The directory is `cache_dir`, else $DDPM_JAX_COMPILATION_CACHE, else `default_cache_dir()`;
    "off" (either way) disables it. Returns the directory, or None when disabled. Call it before
    the first jit: the train step of the digits config takes ~7 s to compile on 2 CPU cores
    (CIFAR-10: ~22 s), and loads from the cache in a fraction of that
    (benchmarks/results/compilation_cache_cpu.md).
    """
    choice = str(cache_dir) if cache_dir is not None else os.environ.get(CACHE_ENV, "")
    if choice.strip().lower() == "off":
        return None
    path = pathlib.Path(choice).expanduser() if choice.strip() else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX caches only programs that took >= 1 s to compile by default; the sampler's and the
    # evaluation's smaller programs take 0.2-1 s on CPU, which a start pays again each time.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("JAX compilation cache: %s", path)
    return path
