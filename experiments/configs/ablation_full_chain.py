"""The bound alone on the full T-step chain (K = T) for the fixed and analytic σ: no sampling, 1 seed.

Ho et al. 2020 report the bound of the full chain; sampling 1000 steps on CPU is
what the quickstart cannot afford, the bound on the digits test split it can (minutes).
"""

import ml_collections

from ddpm_jax.from_config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file("ablation_default.py")
    config.variances = ("fixed_large", "fixed_small", "learned_range", "analytic")
    config.ddim_etas = ()
    config.num_steps = (1000,)
    config.seeds = (0,)
    config.sample.num_samples = 0  # the bound only
    config.nll.num_examples = 297  # the whole digits test split
    config.nll.batch_size = 297
    config.gamma.num_examples = 250  # Γ_t at all 1000 steps: 250 000 network calls
    config.gamma.batch_size = 250
    config.quality.kind = "none"
    config.spacings = ("even",)  # K = T keeps every step whatever the spacing
    return config
