"""σ_t ablation for CI: K ∈ {2, 5}, the analytic σ, a user-defined σ and DDIM η=0, 2 seeds, 16 samples; about a minute on CPU."""

import ml_collections

from ddpm_jax.from_config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file("ablation_default.py")
    # learned_range is skipped for a fixed-variance model; geometric is the README's own σ.
    config.variances = ("learned_range", "analytic", "experiments/custom_sigma.py:GEOMETRIC")
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
    config.spacings = ("even", "optimal")
    config.reference = "analytic"
    return config
