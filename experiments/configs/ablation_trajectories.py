"""Even vs optimal K-step trajectories (Bao et al. 2022 §4) for the fixed and analytic σ, bound only.

The pair costs need Γ_t and E||ε − ε_θ||²/d at all T = 1000 steps (250 training images: 250,000
network calls), which does not fit the quickstart's budget; this config runs them on its own:
  python -m experiments.sigma_ablation --config=experiments/configs/ablation_trajectories.py \
      --workdir=workdir_quickstart --config.output_dir=results/sigma_ablation_trajectories
"""

import ml_collections

from ddpm_jax.from_config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file("ablation_default.py")
    config.variances = ("fixed_large", "fixed_small", "analytic")
    config.ddim_etas = ()
    config.num_steps = (10, 25, 50)
    config.spacings = ("even", "optimal")
    config.seeds = (0, 1)
    config.sample.num_samples = 0  # the bound only
    config.nll.num_examples = 297  # the whole digits test split
    config.nll.batch_size = 297
    config.gamma.num_examples = 250
    config.gamma.batch_size = 250
    config.quality.kind = "none"
    return config
