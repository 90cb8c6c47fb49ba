"""σ_t ablation at quickstart size (minutes on 2 CPU cores): K ∈ {10, 25, 50}, 2 seeds, 300 samples."""

import importlib.util
import pathlib

import ml_collections


def _default() -> ml_collections.ConfigDict:
    # Config files are loaded by path, so the full-size one is loaded from its file beside this one.
    spec = importlib.util.spec_from_file_location("ablation_default", pathlib.Path(__file__).with_name("ablation_default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = _default()
    config.num_steps = (10, 25, 50)
    config.seeds = (0, 1)
    config.sample.num_samples = 300
    config.sample.batch_size = 300
    config.nll.num_examples = 297  # the whole digits test split
    config.nll.batch_size = 297
    config.gamma.num_examples = 500
    config.gamma.batch_size = 250
    config.grid_size = 49
    config.quality.kid_subsets = 50
    return config
