"""ddpm_jax.utils.runtime: the project's XLA flags and malloc settings yield to the user's; the compilation cache's directory."""

import os
import platform
import subprocess
import sys

import jax
import pytest

from ddpm_jax.utils import runtime

PRINT_FLAGS = "import os, ddpm_jax; print(repr(os.environ.get('XLA_FLAGS')))"


def flags_seen_by_a_fresh_process(env_changes: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")} | env_changes
    out = subprocess.run([sys.executable, "-c", PRINT_FLAGS], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_project_flags_only_when_the_user_set_none():
    assert flags_seen_by_a_fresh_process({}) == repr(" ".join(runtime.CPU_XLA_FLAGS))
    assert flags_seen_by_a_fresh_process({"XLA_FLAGS": ""}) == repr("")
    assert flags_seen_by_a_fresh_process({"XLA_FLAGS": "--xla_cpu_use_onednn=true"}) == repr(
        "--xla_cpu_use_onednn=true")
    assert flags_seen_by_a_fresh_process({"JAX_PLATFORMS": "cuda"}) == repr(None)


def test_no_flags_once_the_backend_runs(monkeypatch):
    jax.devices()  # the backend has started: XLA would not read the flags any more
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not runtime.set_default_xla_flags()
    assert "XLA_FLAGS" not in os.environ


@pytest.fixture
def restore_cache_config():
    before = {name: jax.config.values[name] for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    yield
    for name, value in before.items():
        jax.config.update(name, value)


def test_compilation_cache_directory(tmp_path, monkeypatch, restore_cache_config):
    monkeypatch.setenv(runtime.CACHE_ENV, "off")
    assert runtime.enable_compilation_cache() is None
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "env"))
    assert runtime.enable_compilation_cache() == tmp_path / "env"
    assert jax.config.values["jax_compilation_cache_dir"] == str(tmp_path / "env")
    assert runtime.enable_compilation_cache(tmp_path / "arg") == tmp_path / "arg"  # an argument wins
    monkeypatch.delenv(runtime.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.enable_compilation_cache() == tmp_path / "xdg" / "ddpm_jax" / "jax_cache"
    assert (tmp_path / "xdg" / "ddpm_jax" / "jax_cache").is_dir()


# A jitted function whose 128 MiB temporary (tanh(x @ w), between two dots) XLA:CPU allocates and
# frees on every call; prints whether ddpm_jax tuned malloc and the faulted pages per call as a
# fraction of the temporary's, over calls 3-6.
FAULTS_PER_CALL = """
import resource, ddpm_jax, jax, jax.numpy as jnp
from ddpm_jax.utils import runtime
f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
x, w = jnp.ones((16384, 64)), jnp.full((64, 2048), 1e-3)
for _ in range(2):
    f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x, w).block_until_ready()
print(runtime.malloc_tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4 / (2**27 // 4096))
"""


def malloc_seen_by_a_fresh_process(env_changes: dict, program: str = FAULTS_PER_CALL) -> subprocess.CompletedProcess:
    names = ("XLA_FLAGS", "JAX_PLATFORMS", runtime.MALLOC_ENV, *runtime._USER_MALLOC_ENV,
             runtime._ASYNC_DISPATCH.upper())
    env = {k: v for k, v in os.environ.items() if k not in names} | env_changes
    return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_xla_cpu_reuses_its_temporaries_instead_of_faulting_them_in():
    tuned, faults = malloc_seen_by_a_fresh_process({}).stdout.split()
    assert tuned == "True" and float(faults) < 0.1
    # glibc's own settings: a fresh mmap of the whole temporary on every call.
    untuned, faults = malloc_seen_by_a_fresh_process({runtime.MALLOC_ENV: "system"}).stdout.split()
    assert untuned == "False" and float(faults) > 0.9


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_malloc_left_alone_when_the_user_chose_or_an_accelerator_computes():
    print_tuned = "import ddpm_jax; from ddpm_jax.utils import runtime; print(runtime.malloc_tuned)"
    for env in ({"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},
                {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "cpu,cuda"}, {runtime.MALLOC_ENV: "system"}):
        assert malloc_seen_by_a_fresh_process(env, print_tuned).stdout.strip() == "False", env
    assert malloc_seen_by_a_fresh_process({"JAX_PLATFORMS": "cpu"}, print_tuned).stdout.strip() == "True"
    bad = malloc_seen_by_a_fresh_process({runtime.MALLOC_ENV: "jemalloc"}, print_tuned)
    assert bad.returncode != 0 and "DDPM_JAX_MALLOC must be 'tuned' (the default) or 'system'" in bad.stderr


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_tuning_runs_single_device_computations_inline_unless_the_user_chose():
    print_both = ("import ddpm_jax, jax; from ddpm_jax.utils import runtime; "
                  "print(runtime.malloc_tuned, jax.config.read(runtime._ASYNC_DISPATCH))")
    assert malloc_seen_by_a_fresh_process({}, print_both).stdout.split() == ["True", "False"]
    assert malloc_seen_by_a_fresh_process({runtime.MALLOC_ENV: "system"}, print_both).stdout.split() == ["False", "True"]
    chose = malloc_seen_by_a_fresh_process({"JAX_CPU_ENABLE_ASYNC_DISPATCH": "true"}, print_both)
    assert chose.stdout.split() == ["True", "True"]


def test_malloc_left_alone_once_the_backend_runs():
    jax.devices()  # XLA's threads exist and have their arenas
    assert not runtime.tune_malloc_for_xla_cpu()
