"""Process-wide JAX settings, in one place: XLA's CPU flags, glibc malloc for XLA:CPU, the compilation cache.

Each acts only when set before JAX does the corresponding work: the flags before the
backend starts (XLA reads XLA_FLAGS once, when the first computation or device query
creates the backend), malloc before XLA's threads first allocate (also at backend start),
the cache before the first compilation. `ddpm_jax/__init__.py` calls
`set_default_xla_flags()` and `tune_malloc_for_xla_cpu()` on import; entry points
(ddpm_jax/main.py, the experiment scripts) call `enable_compilation_cache()` first thing.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import pkgutil
import platform
from importlib import metadata, util

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
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)

CACHE_ENV = "DDPM_JAX_COMPILATION_CACHE"
MALLOC_ENV = "DDPM_JAX_MALLOC"
malloc_tuned = False  # whether tune_malloc_for_xla_cpu acted in this process

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# What tune_malloc_for_xla_cpu sets: no mmap'd chunks, up to 2 GiB - 1 of free heap top kept.
MALLOC_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
# The JAX option tune_malloc_for_xla_cpu turns off (its environment variable: the user's choice wins).
_ASYNC_DISPATCH = "jax_cpu_enable_async_dispatch"
# Environment variables through which a user already chose glibc malloc's behaviour.
_USER_MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


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


def _accelerator_plugin_installed() -> bool:
    """Whether JAX would find a GPU/TPU plugin: libtpu, a jax_plugins module or entry point (as xla_bridge looks)."""
    if util.find_spec("libtpu") is not None:
        return True
    plugins = xla_bridge.jax_plugins
    if plugins is not None and any(True for _ in pkgutil.iter_modules(plugins.__path__)):
        return True
    return bool(metadata.entry_points(group="jax_plugins"))


def tune_malloc_for_xla_cpu() -> bool:
    """Let XLA:CPU reuse its temporaries instead of faulting fresh pages in on every call (glibc only).

    XLA:CPU allocates each execution's temporaries as one block with posix_memalign and frees it
    at the end. With JAX's default asynchronous CPU dispatch the block is requested from a worker
    thread, whose glibc arena cannot hold more than 64 MiB: glibc maps a larger block afresh
    (whatever M_MMAP_MAX says) and unmaps it on free, so every step faults the whole block in
    again: 23,445 minor faults (96 MB) per digits train step at batch 128, about 164,000 (670 MB)
    per CIFAR-10 step at batch 8, with 55-72 ms and 0.44-0.67 s of system time. So this function
      - runs single-device computations inline on the calling thread (jax_cpu_enable_async_dispatch
        False; JAX still dispatches multi-device computations asynchronously), whose main arena
        grows with brk and can hold any block, and
      - tells glibc not to mmap chunks and to keep up to 2 GiB of free heap top (MALLOC_SETTINGS),
    so the freed block stays on the heap and the next call gets it back, already faulted in.
    Measured 2026-12-03 on the project's 2-core AMD EPYC, fresh processes alternated (bare train
    step on a fixed batch, ms per step, three runs of 60 each):
      digits batch 128, program compiled in the process: 158-179 against 196-230 (faults 0 against
        23,445); loaded from the compilation cache: 154-164 against 176-193;
      CIFAR-10 batch 8 (runs of 8): 2.37-2.52 s against 2.64-2.83 s (faults 194 against 164,230).
    Either half alone leaves the faults (inline dispatch alone: the block is still mmap'd, being
    over glibc's 32 MiB ceiling for a dynamic mmap threshold; no mmap alone: the worker thread's
    arena still maps it). An earlier variant with one arena for all threads (M_ARENA_MAX=1) instead
    of inline dispatch also removed the faults but slowed a program compiled in the same process
    (231-269 ms against 200-222 ms), i.e. every cold start; this one does not. The price: the
    process keeps up to 2 GiB of memory it freed instead of returning it to the system, and the
    Python thread waits for each single-device computation instead of running ahead of it.

    Acts only in a fresh process (JAX's backend not started) that computes on the CPU
    (JAX_PLATFORMS lists only cpu, or it is unset and no GPU/TPU plugin is installed), when
    DDPM_JAX_MALLOC is not "system" and the user set none of glibc's malloc variables; it leaves
    dispatch alone when the user set JAX_CPU_ENABLE_ASYNC_DISPATCH. Returns whether it acted.
    """
    choice = os.environ.get(MALLOC_ENV, "tuned").strip().lower() or "tuned"
    if choice not in ("tuned", "system"):
        raise ValueError(f"{MALLOC_ENV} must be 'tuned' (the default) or 'system' (glibc's own settings), "
                         f"got {os.environ[MALLOC_ENV]!r}")
    if choice == "system" or any(v in os.environ for v in _USER_MALLOC_ENV):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or xla_bridge.backends_are_initialized():
        return False
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and platforms != ["cpu"] or not platforms and _accelerator_plugin_installed():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    global malloc_tuned
    malloc_tuned = all([mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS])
    if malloc_tuned and _ASYNC_DISPATCH.upper() not in os.environ:
        jax.config.update(_ASYNC_DISPATCH, False)
    return malloc_tuned


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
