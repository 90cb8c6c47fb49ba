"""LSUN Bedroom 256×256, Ho et al. 2020 Appendix B: the 114M-parameter UNet (ch 128, ch_mult (1, 1, 2, 2, 4, 4),
attention at 16×16), T = 1000 linear, batch 64, lr 2e-5, dropout 0, random flips, 2,400_000 steps.
"""

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
    config.data.dataset = "lsun/bedroom"
    config.data.image_size = 256
    config.data.random_flip = True
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.training.batch_size = 64
    config.training.lr = 2e-5
    config.training.dropout = 0.0
    config.training.num_train_steps = 2_400_000
    config.training.sample_every = 100_000
    config.sampling.batch = 16
    config.eval.split = "validation"
    config.eval.batch_size = 16
    return config
