"""σ_t ablation at full size: every σ choice at K ∈ {10, 25, 50, 100, 200, 1000}, 3 seeds.

Run on a trained model's workdir (EMA weights of the newest checkpoint):
  python -m experiments.sigma_ablation --config=experiments/configs/ablation_default.py --workdir=RUN_DIR
Results go to config.output_dir (default RUN_DIR/sigma_ablation). Sample quality is
FDD/KID/IS on the digits classifier for digits, FID/IS/KID when
quality.inception_weights (or $DDPM_JAX_FID_WEIGHTS) names the converted weights file.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.checkpoint_step = config_dict.placeholder(int)  # None: the newest intact checkpoint
    config.output_dir = config_dict.placeholder(str)  # None: <workdir>/sigma_ablation
    # Γ_t, E||ε − ε_θ||² and the trajectories' pair costs, kept per checkpoint and reused by later runs.
    config.cache_dir = config_dict.placeholder(str)  # None: <workdir>/sigma_ablation/cache

    # Names of ddpm_jax.variances.VARIANCES or 'module:NAME' / 'path/file.py:NAME' of your own Variance record.
    # learned_range / learned run only for a model trained with that variance.
    config.variances = ("fixed_large", "fixed_small", "learned_range", "analytic")
    config.ddim_etas = (0.0, 0.5, 1.0)
    config.num_steps = (10, 25, 50, 100, 200, 1000)
    # 'even' | 'quad' | 'uniform' (ddpm_jax.schedules.space_timesteps) | 'optimal': the K steps that minimise
    # each σ choice's bound (Bao et al. 2022 §4), by dynamic programming over pair costs estimated from the
    # training images of the gamma group at all T steps (ddpm_jax/trajectories.py).
    config.spacings = ("even", "optimal")
    # Every row's bound (and sample quality, per seed) is also reported as a paired difference to this choice's.
    config.reference = "fixed_large"  # "" (or None): no paired differences
    config.seeds = (0, 1, 2)
    config.grid_size = 64  # samples of the first seed in each setting's grid

    # Paper conventions (each stated in every results file). See ddpm_jax/variances.py.
    config.conventions = ml_collections.ConfigDict()
    # Decoder-step variance σ_1²: 'full_chain' (β̃_2 of the T-step chain for every σ choice, as
    # Analytic-DPM's code, whose Table 1 the README compares with), 'sub_chain' (improved-diffusion),
    # 'floor_sub_chain' (this codebase's analytic σ before 2026-12), or 'own' (each record's default).
    config.conventions.decoder = "full_chain"
    # Analytic-DPM's sampler clips σ² on the last noisy steps (its released runs: 1 step, 2 levels);
    # 0 = off, as Ho et al. and improved-diffusion sample.
    config.conventions.sigma_clip_steps = 0
    config.conventions.sigma_clip_pixel = 2.0
    # The decoder's normal CDF in L_0: 'exact' log Φ, or 'tanh', the approximation in Ho et al.'s and
    # improved-diffusion's code (for bits/dim comparable with their tables; up to ~0.03 bits/dim per image).
    config.conventions.cdf = "exact"

    config.sample = ml_collections.ConfigDict()
    config.sample.num_samples = 1000
    config.sample.batch_size = 500
    config.sample.clip_x0 = True  # Ho et al.'s sampler clips x̂_0 to [-1, 1]

    config.nll = ml_collections.ConfigDict()
    config.nll.split = "test"
    config.nll.num_examples = config_dict.placeholder(int)  # None: the whole split
    config.nll.batch_size = 250
    config.nll.clip_x0 = False  # the bound of the unclipped p_θ, as Bao et al. report it

    config.gamma = ml_collections.ConfigDict()  # Γ_t for the analytic variance, from training images
    config.gamma.num_examples = 1000
    config.gamma.batch_size = 250
    config.gamma.seed = 1234

    config.quality = ml_collections.ConfigDict()
    config.quality.kind = "auto"  # 'digits' | 'inception' | 'none' | 'auto'
    config.quality.inception_weights = config_dict.placeholder(str)  # None: $DDPM_JAX_FID_WEIGHTS if set
    config.quality.reference_split = "test"
    config.quality.classifier_seed = 0
    config.quality.classifier_steps = 500
    config.quality.kid_subsets = 100
    config.lock()  # a misspelled override fails at once
    return config
