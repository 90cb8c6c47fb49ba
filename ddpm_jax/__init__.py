"""ddpm_jax: Denoising Diffusion Probabilistic Models in JAX/Flax.

Data flows one way: config -> data -> model -> diffusion math -> loss ->
train step -> checkpoint -> sampler -> evaluation.
"""

__version__ = "0.1.0"
