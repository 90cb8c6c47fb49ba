"""For tests: a ~40k-parameter UNet on the 8×8 digits, T = 100, batch 16; a run takes seconds on CPU."""

import ml_collections

from ddpm_jax.from_config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file("default.py")
    config.data.dataset = "digits"
    config.data.random_flip = False
    config.model.ch = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.num_groups = 4
    config.diffusion.num_timesteps = 100
    config.training.batch_size = 16
    config.training.num_train_steps = 20
    config.training.lr = 1e-3
    config.training.warmup_steps = 2
    config.training.ema_decay = 0.9
    config.training.dropout = 0.1
    config.training.log_every = 5
    config.training.save_every = 10
    config.training.keep_checkpoints = 3
    config.training.sample_every = 0
    config.training.max_consecutive_nonfinite = 3
    config.sampling.batch = 8
    config.sampling.num_steps = 10
    config.eval.batch_size = 16
    config.eval.num_batches = 1
    config.eval.num_steps = 10
    return config
