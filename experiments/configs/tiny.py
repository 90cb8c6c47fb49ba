"""For tests: a ~40k-parameter UNet on the 8×8 digits, T = 100, batch 16; a run takes seconds on CPU."""

import importlib.util
import pathlib

import ml_collections


def _base() -> ml_collections.ConfigDict:
    # Config files are loaded by path (config_flags), not as a package, so the
    # shared base is loaded from its file beside this one.
    spec = importlib.util.spec_from_file_location("ddpm_base_config", pathlib.Path(__file__).with_name("default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = _base()
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
