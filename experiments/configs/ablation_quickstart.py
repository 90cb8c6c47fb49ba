"""σ_t ablation at quickstart size (minutes on 2 CPU cores): K ∈ {10, 25, 50}, 2 seeds, 300 samples."""

import ml_collections

from ddpm_jax.from_config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file("ablation_default.py")
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
    config.spacings = ("even",)  # the optimal trajectories run as their own command (ablation_trajectories.py)
    return config
