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
#   --xla_cpu_experimental_ynn_fusion_type=dot,reduce
# YNNPACK (XLA's CPU kernel library) for matrix products and reductions; convolutions and
# elementwise fusions stay with XLA's own emitters (Eigen convolutions, loop fusions). XLA's
# default also hands single convolutions to YNNPACK, so the flag is needed to keep them out.
# Measured 2026-12-03 on the project's 2-core AMD EPYC (jax 0.10.2), every variant of the
# train step compiled in one process (compiler_options) and timed interleaved, wall seconds per
# step, median of 12-18:
#   CIFAR-10 batch 8: dot,eltwise,reduce,individual_convolution (the previous choice) 2.36-2.73,
#     dot,eltwise,reduce 2.56, dot,reduce 2.09-2.38, reduce 2.31, dot 2.98, none 2.89;
#   digits batch 128: previous 0.196-0.219, dot,eltwise,reduce 0.190, dot,reduce 0.174-0.180,
#     reduce 0.170, dot 0.178, none 0.181.
# dot,reduce is 0.82-0.90x the previous step time at both sizes (CPU seconds about equal: the
# Eigen convolutions keep both cores busier). YNNPACK's convolutions lose at the CIFAR-10 shapes
# once forward, input and kernel gradient run together (the 19 distinct 3x3 convolutions of that
# UNet, each forward + both gradients: 1.83 s with YNNPACK, 1.50 s without, 1.48 s for PyTorch's
# oneDNN); YNNPACK's eltwise fusions materialise the scalar broadcasts of the Adam/EMA update
# (that update alone: 0.17 s with them, 0.11 s without). XNNPACK convolutions
# (--xla_cpu_experimental_xnn_fusion_type=individual_convolution) were within noise of Eigen's;
# --xla_cpu_prefer_vector_width=512 gave no gain (CIFAR-10 2.28 vs 2.19 s).
# Tried without gain: --xla_cpu_use_onednn / --xla_cpu_experimental_onednn_custom_call (no oneDNN
# call appears in the compiled step), --xla_cpu_enable_concurrency_optimized_scheduler (within 2%),
# kernel layouts OIHW/OHWI/HWOI and explicit padding (noise), kernel gradients as im2col or
# shifted-slice matmuls (1.0-3.3x slower: a custom_vjp under the per-example vmap of train_step
# computes a kernel gradient per example), a hand-fused Adam + EMA (no gain), the model batched
# instead of vmapped (same CPU time). Dropout costs nothing measurable (CIFAR-10 step with
# dropout 0: same time). Side by side with PyTorch: scripts/bench_train.py --peer, bench_parts.py.
# Not done: glibc malloc settings. XLA:CPU allocates each execution's temporaries as one block
# (posix_memalign from a worker thread); glibc maps a block over 64 MiB afresh and unmaps it on
# free, so every step faults it in again: 23,445 minor faults (96 MB, 55-65 ms of system time) per
# digits step at batch 128, ~164,000 (670 MB, 0.44-0.67 s) per CIFAR-10 step at batch 8. One arena,
# no mmap'd chunks and a 2 GiB trim threshold (mallopt M_ARENA_MAX=1, M_MMAP_MAX=0,
# M_TRIM_THRESHOLD) removed the faults and kept the weights bit-identical, but measured 2026-12-03
# (digits loop, fresh processes alternated) it helped only a program loaded from the persistent
# compilation cache (177-183 ms against 199-200 ms per step) and hurt one compiled in the same
# process, i.e. every cold start (231-269 ms against 200-222 ms, with more user time in XLA's
# threads; cause not found). glibc.malloc.hugetlb=1 cut the faults to 474 per step, not the time.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)

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
