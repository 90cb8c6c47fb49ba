"""The ablation's store without running an ablation: run identity, output directory, statistics cache.

The end-to-end checks (a killed run resumes to the uninterrupted tables; a changed config is refused and
reuses the cached statistics) are slow-marked in test_ablation_resume.py; these keep the same rules in
the default suite.
"""

import os

import numpy as np
import pytest

from experiments.sigma_ablation import store
from experiments.sigma_ablation.store import MANIFEST
from ddpm_jax import from_config

CHECKPOINT = {"step": 100, "crc32": 1234}


def _config(**training):
    config = from_config.default_config()
    for key, value in training.items():
        config.training[key] = value
    return config


def test_same_identity_resumes_a_changed_one_is_refused_naming_the_field(tmp_path):
    out = str(tmp_path / "ablation")
    ident = store.identity(_config(), CHECKPOINT)
    assert store.open_output_dir(out, ident, new_output_dir=False, writer=True) == out
    assert os.path.exists(os.path.join(out, MANIFEST))
    # The manifest read back from JSON compares equal to the live identity: the same run resumes there.
    assert store.open_output_dir(out, store.identity(_config(), CHECKPOINT), new_output_dir=False, writer=True) == out

    batch = _config().training.batch_size + 1
    changed = store.identity(_config(batch_size=batch), CHECKPOINT)
    with pytest.raises(ValueError, match=r"changed: config\.training\.batch_size"):
        store.open_output_dir(out, changed, new_output_dir=False, writer=True)
    other_checkpoint = store.identity(_config(), {**CHECKPOINT, "step": 101})
    with pytest.raises(ValueError, match=r"changed: checkpoint\.step"):
        store.open_output_dir(out, other_checkpoint, new_output_dir=False, writer=True)

    assert store.open_output_dir(out, changed, new_output_dir=True, writer=True) == out + "_1"
    assert store.open_output_dir(out, changed, new_output_dir=True, writer=True) == out + "_1"  # resumes there
    assert store.open_output_dir(out, other_checkpoint, new_output_dir=True, writer=True) == out + "_2"


def test_changed_fields_lists_added_removed_and_changed_leaves():
    old = {"config": {"a": 1, "b": {"c": [1, 2]}}, "checkpoint": {"step": 1}}
    new = {"config": {"a": 1, "b": {"c": (1, 3)}, "d": 0}, "checkpoint": {}}
    assert store.changed_fields(old, new) == ["checkpoint.step", "config.b.c", "config.d"]
    assert store.changed_fields(old, {"config": {"a": 1, "b": {"c": (1, 2)}}, "checkpoint": {"step": 1}}) == []


def test_cache_computes_once_per_checkpoint_and_fields_and_only_the_writer_saves(tmp_path):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"gamma": np.full(3, value, np.float64)}
        return run

    cache = store.Cache(str(tmp_path / "cache"), CHECKPOINT, writer=True)
    first = cache.get("statistics", {"K": 10}, compute(1.0))
    again = store.Cache(str(tmp_path / "cache"), dict(CHECKPOINT), writer=True).get(
        "statistics", {"K": 10}, compute(2.0))
    np.testing.assert_array_equal(again["gamma"], first["gamma"])
    assert calls == [1.0]
    assert [e[:2] for e in cache.events] == [("statistics", "computed")]

    cache.get("statistics", {"K": 25}, compute(3.0))                       # other fields
    store.Cache(str(tmp_path / "cache"), {**CHECKPOINT, "crc32": 9}, writer=True).get(
        "statistics", {"K": 10}, compute(4.0))                             # other checkpoint
    assert calls == [1.0, 3.0, 4.0]

    reader = store.Cache(str(tmp_path / "reader"), CHECKPOINT, writer=False)
    reader.get("statistics", {"K": 10}, compute(5.0))
    assert not os.path.exists(tmp_path / "reader")
    assert calls[-1] == 5.0


def test_a_file_holding_another_runs_arrays_is_recomputed(tmp_path):
    cache = store.Cache(str(tmp_path), CHECKPOINT, writer=True)
    path = cache.path("statistics", {"K": 10})
    store.write_npz(path, {"gamma": np.zeros(3), "__meta__": np.array('{"kind": "other"}')})
    out = cache.get("statistics", {"K": 10}, lambda: {"gamma": np.ones(3)})
    np.testing.assert_array_equal(out["gamma"], np.ones(3))
    assert cache.events[-1][1] == "computed"
