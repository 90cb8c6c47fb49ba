"""Your own σ_t, defined outside the package: the geometric mean of Ho et al.'s two choices.

σ_t² = √(β_t β̃_t), between β̃_t (fixed_small) and β_t (fixed_large). Pass it by object
(`sampling.sample(..., variance=GEOMETRIC)`) or by name in a config:
`config.variances = ("fixed_large", "experiments/custom_sigma.py:GEOMETRIC")`.
The README shows this file; tests/test_variances.py runs it through sampling, the bound and the ablation.
"""

import numpy as np

from ddpm_jax import variances


def geometric(chain, stats):
    """σ_t² = √(β_t β̃_t) on the (sub-)chain, float64 [K]; t = 1 is set by the decoder convention."""
    return np.sqrt(chain.betas * chain.posterior_variance)


GEOMETRIC = variances.Variance("geometric", geometric, source="σ² = √(β β̃), an example")
