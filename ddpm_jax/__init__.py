"""ddpm_jax: Denoising Diffusion Probabilistic Models in JAX/Flax.

Data flows one way: config -> data -> model -> diffusion math -> loss ->
train step -> checkpoint -> sampler -> evaluation.
"""

__version__ = "0.1.0"

# XLA:CPU flags and glibc malloc settings measured to speed up training, set before JAX starts its
# backend (unless the user chose their own): see ddpm_jax/utils/runtime.py.
from ddpm_jax.utils import runtime as _runtime  # noqa: E402

_runtime.set_default_xla_flags()
_runtime.tune_malloc_for_xla_cpu()
