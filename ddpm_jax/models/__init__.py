"""Flax UNet of Ho et al. 2020 (Appendix B) and its layers."""

from ddpm_jax.models.layers import get_timestep_embedding
from ddpm_jax.models.unet import UNet, check_unet_config, count_params

__all__ = ["UNet", "check_unet_config", "count_params", "get_timestep_embedding"]
