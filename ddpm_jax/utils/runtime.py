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
# CPU compiler, so GPU/TPU programs are unaffected.
#   --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_convolution
# XLA already hands single convolutions and reductions to YNNPACK; this adds matrix products
# and fusions of elementwise ops. A profile of the digits train step (jax.profiler, 2 cores)
# put 49% of the thread time in YNNPACK convolutions (the kernel gradients the largest),
# 26% in the transposes and copies XLA inserts around them, 7% in elementwise fusions,
# 9% in dots. Measured (2-core AMD EPYC, jax 0.10.2, other jobs running, CPU-s per step,
# min over 6 steps): digits batch 128: XLA's defaults 0.394, +dot 0.375,
# +dot,individual_convolution 0.355, +reduce 0.331, all four 0.302 (0.77x);
# CIFAR-10 batch 8: no change (5.26-5.45 vs 5.33-5.64 CPU-s, two runs each), loss and
# gradient norm equal to 7 digits. (--xla_cpu_use_onednn, fast math and bf16 matmul
# precision changed nothing, per the filer.) Writing the 3x3 convolutions as im2col +
# matmul, or a custom_vjp whose kernel gradient is one matmul over im2col patches, was slower
# (digits: 0.52 and 1.2 CPU-s per step against 0.33 for lax.conv): XLA's CPU convolutions
# beat its dots on these shapes, and a custom_vjp under the per-example vmap of train_step
# computes a kernel gradient per example.
# Re-measured 2026-12-03 (load ~1.5), each pair compiled in one process and interleaved: CIFAR-10
# batch 8 without 'eltwise' 2.46 s wall vs 2.47 s with it (alone, eltwise materialises the scalar
# broadcasts of the Adam/EMA update: that update took 0.17 s with it, 0.11 s without); digits
# without it 0.223 s vs 0.201 s. --xla_cpu_enable_concurrency_optimized_scheduler either way:
# within 2%. Op by op, XLA's 3x3 convolutions take 0.7-1.4x oneDNN's time at CIFAR-10 shapes and
# up to 2.6x at the digits UNet's 8x8 and 4x4 (scripts/bench_parts.py).
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
    the first jit. Measured on the shared 2-core machine (load ~7; benchmarks/results/
    compilation_cache_cpu.md): a digits start to the first step took 105 s cold, 55 s warm; XLA's
    compilation of the train step 96 s cold, 13 s as a cache hit, of _init_state 31 s -> 3.5 s.
    Tracing and lowering (19 + 3 s for the train step) are paid on every start: the cache key
    is computed from the lowered program.
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
