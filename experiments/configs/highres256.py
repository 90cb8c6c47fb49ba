"""The 256×256 models of Ho et al. 2020 (Appendix B), one config with the data set as its argument:

  --config=experiments/configs/highres256.py:celebahq   CelebA-HQ, 500,000 steps
  --config=experiments/configs/highres256.py:church     LSUN Church, 1,200,000 steps
  --config=experiments/configs/highres256.py:bedroom    LSUN Bedroom, 2,400,000 steps

Shared: the 114M-parameter UNet (ch 128, ch_mult (1, 1, 2, 2, 4, 4), attention at 16×16),
T = 1000 linear, batch 64, lr 2e-5, dropout 0, random flips.
"""

import ml_collections

from ddpm_jax.from_config import load_config_file

# argument -> (TFDS name, training steps, split the bound is evaluated on)
DATASETS = {
    "celebahq": ("celeb_a_hq", 500_000, "train"),
    "church": ("lsun/church_outdoor", 1_200_000, "validation"),
    "bedroom": ("lsun/bedroom", 2_400_000, "validation"),
}


def get_config(dataset: str = "celebahq") -> ml_collections.ConfigDict:
    if dataset not in DATASETS:
        raise ValueError(f"highres256.py:<dataset> must be one of {sorted(DATASETS)}, got {dataset!r}")
    name, steps, eval_split = DATASETS[dataset]
    config = load_config_file("default.py")
    config.data.dataset = name
    config.data.image_size = 256
    config.data.random_flip = True
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.training.batch_size = 64
    config.training.lr = 2e-5
    config.training.dropout = 0.0
    config.training.num_train_steps = steps
    config.training.sample_every = 100_000
    config.sampling.batch = 16
    config.eval.split = eval_split
    config.eval.batch_size = 16
    return config
