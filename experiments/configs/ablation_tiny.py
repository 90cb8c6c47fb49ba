"""σ_t ablation for CI: K ∈ {2, 5}, the analytic σ and DDIM η=0, 2 seeds, 16 samples; about a minute on CPU."""

import importlib.util
import pathlib

import ml_collections


def _default() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("ablation_default", pathlib.Path(__file__).with_name("ablation_default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = _default()
    config.variances = ("learned_range", "analytic")  # learned_range is skipped for a fixed-variance model
    config.ddim_etas = (0.0,)
    config.num_steps = (2, 5)
    config.seeds = (0, 1)
    config.sample.num_samples = 16
    config.sample.batch_size = 16
    config.nll.num_examples = 16
    config.nll.batch_size = 16
    config.gamma.num_examples = 32
    config.gamma.batch_size = 32
    config.grid_size = 16
    config.quality.classifier_steps = 20
    config.quality.kid_subsets = 5
    return config
