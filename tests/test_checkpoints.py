"""Checkpoints: exact round trip, keep-N, damaged-newest fallback, EMA loading, run metadata.

The states here are small synthetic TrainStates (a dict of params and a real
optax Adam state), so no model is compiled; the loop-level resume is in test_train.
"""

import glob
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ddpm_jax import checkpoints, train


def _state(seed: int, step: int) -> train.TrainState:
    rng = np.random.default_rng(seed)
    # Big enough (74 kB) that OCDBT stores the kernel in a data file, not inline in its index.
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 32, 64)).astype(np.float32),
                       "bias": rng.normal(size=(64,)).astype(np.float32)}}
    opt_state = optax.adam(1e-3).init(params)
    # Non-trivial moments, so a restore that dropped them would be caught.
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt_state)
    ema = jax.tree.map(lambda x: 0.9 * x, params)
    return train.TrainState(step=jnp.int32(step), params=params, ema_params=ema, opt_state=opt_state,
                            nonfinite_count=jnp.int32(seed), consecutive_nonfinite=jnp.int32(1))


def _abstract(state: train.TrainState) -> tuple:
    mesh = train.make_mesh()
    abstract = train.abstract_replicated(state, mesh)
    return train.without_ema(abstract), abstract.ema_params


def _save(manager, state: train.TrainState, meta=None) -> None:
    checkpoints.save(manager, int(state.step), train.without_ema(state), state.ema_params,
                     meta or {"note": "test"})
    manager.wait_until_finished()


def _assert_trees_equal(a, b) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_is_exact(tmp_path):
    state = _state(seed=3, step=7)
    manager = checkpoints.make_manager(str(tmp_path), max_to_keep=2)
    _save(manager, state, {"git_commit": "abc", "config": {"x": [1, 2]}})
    restored = checkpoints.restore_latest(manager, *_abstract(state))
    manager.close()
    assert restored.step == 7
    checksums = {"state": checkpoints.checksum(train.without_ema(state)),
                 "ema_params": checkpoints.checksum(state.ema_params)}
    assert restored.meta == {"step": 7, "git_commit": "abc", "config": {"x": [1, 2]}, "checksums": checksums}
    rebuilt = train.TrainState(ema_params=restored.ema_params, **restored.state)
    _assert_trees_equal(rebuilt, state)  # includes the optax namedtuple structure


def test_keeps_the_newest_n(tmp_path):
    manager = checkpoints.make_manager(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3, 4):
        _save(manager, _state(seed=step, step=step))
    assert list(manager.all_steps()) == [3, 4]
    manager.close()


def test_a_synchronous_save_is_committed_when_it_returns(tmp_path):
    """asynchronous=False (training's default): no wait needed, the step is finished and restorable."""
    state = _state(seed=5, step=3)
    manager = checkpoints.make_manager(str(tmp_path), max_to_keep=2, asynchronous=False)
    checkpoints.save(manager, 3, train.without_ema(state), state.ema_params, {})
    assert not glob.glob(os.path.join(tmp_path, checkpoints.CHECKPOINT_DIR, "*.orbax-checkpoint-tmp*"))
    reader = checkpoints.make_manager(str(tmp_path), read_only=True)
    assert list(reader.all_steps()) == [3]
    _assert_trees_equal(checkpoints.restore_latest(reader, *_abstract(state)).state["params"], state.params)
    manager.close()
    reader.close()


def _biggest_file(step_dir: str, item: str = "state") -> str:
    """The largest file of an item: the one holding the kernel's bytes."""
    files = [f for f in glob.glob(os.path.join(step_dir, item, "**", "*"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _moved(tmp_path) -> str:
    """A copy of tmp_path/run at a new path, as a restarted job sees it.

    TensorStore caches the bytes it wrote per path within a process, so damage
    done in the saving process is invisible at the old path.
    """
    shutil.copytree(tmp_path / "run", tmp_path / "restarted")
    return str(tmp_path / "restarted")


def _truncate(step_dir: str) -> None:
    path = _biggest_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _delete(step_dir: str) -> None:
    os.remove(_biggest_file(step_dir))


@pytest.mark.parametrize("damage", [_truncate, _delete], ids=["truncated", "deleted"])
def test_damaged_newest_falls_back_with_a_warning(tmp_path, caplog, damage):
    old, new = _state(seed=1, step=10), _state(seed=2, step=20)
    manager = checkpoints.make_manager(str(tmp_path / "run"), max_to_keep=3)
    _save(manager, old)
    _save(manager, new)
    manager.close()
    workdir = _moved(tmp_path)
    damage(os.path.join(workdir, checkpoints.CHECKPOINT_DIR, "20"))

    manager = checkpoints.make_manager(workdir, max_to_keep=3)
    with caplog.at_level(logging.WARNING):
        restored = checkpoints.restore_latest(manager, *_abstract(old))
    assert restored.step == 10
    _assert_trees_equal(train.TrainState(ema_params=restored.ema_params, **restored.state), old)
    assert any(re.search(r"step 20 .*damaged", r.getMessage()) for r in caplog.records)
    # The bad step is moved aside, not deleted, and no longer blocks a new save of step 20.
    assert os.path.isdir(os.path.join(workdir, checkpoints.DAMAGED_DIR, "20"))
    assert list(manager.all_steps()) == [10]
    _save(manager, new)
    assert list(manager.all_steps()) == [10, 20]
    manager.close()


def test_no_checkpoint_restores_none(tmp_path):
    state = _state(seed=0, step=0)
    manager = checkpoints.make_manager(str(tmp_path), max_to_keep=1)
    assert checkpoints.restore_latest(manager, *_abstract(state)) is None
    manager.close()


def test_load_ema_params_reads_the_newest_readable_step(tmp_path, caplog):
    config = ml_collections.ConfigDict({"model": {"ch_mult": (1, 2)}, "training": {"lr": 2e-4}})
    manager = checkpoints.make_manager(str(tmp_path / "run"), max_to_keep=3)
    first, second = _state(seed=1, step=5), _state(seed=2, step=6)
    _save(manager, first, checkpoints.run_metadata(config))
    _save(manager, second, checkpoints.run_metadata(config))
    manager.close()

    loaded = checkpoints.load_ema_params(str(tmp_path / "run"))
    assert loaded.step == 6
    _assert_trees_equal(loaded.params, second.ema_params)
    assert loaded.config.model.ch_mult == (1, 2)  # JSON lists come back as tuples
    assert loaded.config.training.lr == 2e-4

    workdir = _moved(tmp_path)
    os.truncate(_biggest_file(os.path.join(workdir, checkpoints.CHECKPOINT_DIR, "6"), "ema_params"), 1)
    with caplog.at_level(logging.WARNING):
        loaded = checkpoints.load_ema_params(workdir)
    assert loaded.step == 5
    _assert_trees_equal(loaded.params, first.ema_params)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        checkpoints.load_ema_params(str(tmp_path / "empty"))


def test_run_metadata_records_config_and_commit(tmp_path):
    config = ml_collections.ConfigDict({"training": {"batch_size": 128}})
    checkpoints.write_config(str(tmp_path), config)
    meta = checkpoints.run_metadata(config)
    assert meta["config"] == {"training": {"batch_size": 128}}
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", meta["git_commit"])
    with open(tmp_path / "config.json", encoding="utf-8") as f:
        assert '"batch_size": 128' in f.read()


def test_a_checkpoint_of_another_model_is_an_error_not_damage(tmp_path):
    """A changed --config.model.* must not move good checkpoints aside and restart from step 0."""
    state = _state(seed=1, step=10)
    manager = checkpoints.make_manager(str(tmp_path), max_to_keep=3)
    _save(manager, state)
    wider = state.replace(params={"conv": {"kernel": np.zeros((3, 3, 32, 128), np.float32),
                                           "bias": np.zeros((128,), np.float32)}})
    with pytest.raises(ValueError, match=r"step 10 .* another model .*state/params/conv/bias is \(\(64,\), "
                                         r"'float32'\) in the checkpoint but \(\(128,\), 'float32'\)"):
        checkpoints.restore_latest(manager, *_abstract(wider))
    assert list(manager.all_steps()) == [10]
    assert not os.path.exists(os.path.join(str(tmp_path), checkpoints.DAMAGED_DIR))
    manager.close()
