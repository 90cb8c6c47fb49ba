"""ddpm_jax.utils.runtime: the project's XLA flags yield to the user's; the compilation cache's directory."""

import os
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
