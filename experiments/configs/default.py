"""Shared base config: every field, with Ho et al. 2020's CIFAR-10 values (§4, Appendix B).

The experiment files load this one and change what differs. Fields are
checked by `ddpm_jax.config_validation.validate_config`; the config is locked,
so a misspelled override (`--config.training.lr_warmup=...`) fails at once.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "cifar10"
    config.data.image_size = config_dict.placeholder(int)  # None: the dataset's native size
    config.data.random_flip = config_dict.placeholder(bool)  # None: the dataset's default
    config.data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.worker_count = 0  # grain worker processes; 0 reads in threads

    # The CIFAR-10 UNet, 35.7M parameters (Ho et al., Appendix B). out_channels
    # is derived: the image channels, doubled for a learned variance.
    config.model = ml_collections.ConfigDict()
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.num_groups = 32
    config.model.resamp_with_conv = True

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"  # β_1 = 1e-4 ... β_T = 0.02 (Ho §4)
    config.diffusion.num_timesteps = 1000
    config.diffusion.schedule_kwargs = ml_collections.ConfigDict()  # e.g. beta_start, beta_end; s for cosine
    config.diffusion.zero_terminal_snr = False
    config.diffusion.variance = "fixed_large"  # σ_t² = β_t, Ho's CIFAR-10 choice
    config.diffusion.mean_type = "eps"
    config.diffusion.loss_type = "simple"  # L_simple, Ho eq. 14

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128  # GLOBAL batch, split over all processes and devices
    config.training.num_train_steps = 800_000
    config.training.lr = 2e-4
    config.training.warmup_steps = 5000
    config.training.grad_clip = 1.0
    config.training.ema_decay = 0.9999
    config.training.dropout = 0.1
    config.training.bf16 = False  # bfloat16 UNet compute; parameters and Adam stay float32
    # True: average gradients by an all-gather and a sum in device order instead of an all-reduce,
    # so that the same devices split over 1 or many processes give bit-identical training (costs
    # n_devices x the gradient's memory per device). See ddpm_jax/train.py, mean_over_devices.
    config.training.ordered_allreduce = False
    config.training.seed = 0
    config.training.log_every = 100
    config.training.save_every = 5000
    config.training.keep_checkpoints = 3
    # False: training waits until each save is committed, so a crash (SIGKILL, power loss) recomputes
    # at most save_every steps. True: saves are written while training goes on (no pause), and a crash
    # may recompute up to about 2 x save_every + the steps one save takes.
    config.training.async_checkpointing = False
    config.training.sample_every = 50_000  # 0: never
    config.training.max_consecutive_nonfinite = 10

    config.sampling = ml_collections.ConfigDict()
    config.sampling.num_steps = config_dict.placeholder(int)  # None: all T steps; K < T: respaced sub-chain
    config.sampling.variance = "fixed_large"
    config.sampling.eta = config_dict.placeholder(float)  # None: ancestral; a float: DDIM with this η
    config.sampling.batch = 64
    config.sampling.clip_x0 = True  # Ho's sampler clips x̂_0 to [-1, 1]

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.batch_size = 100
    config.eval.num_batches = 2
    config.eval.num_steps = config_dict.placeholder(int)  # None: the full T-step bound

    config.lock()
    # Schedule keywords differ per schedule ('s' for cosine, 'betas' for custom).
    config.diffusion.schedule_kwargs.unlock()
    return config
