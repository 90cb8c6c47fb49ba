"""Building blocks of the DDPM UNet (Ho et al. 2020, Appendix B).

Each block follows `diffusion_tf/models/unet.py` and `diffusion_tf/nn.py` of
the original code (hojonathanho/diffusion): same layer order, same
initialisation, same GroupNorm epsilon (1e-6, the `tf.contrib` default).
All activations are [B, H, W, C] (NHWC). Parameters are float32; `dtype` is
the computation dtype (bfloat16 for mixed precision).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
    """Variance scaling, fan_avg, uniform: `default_init` of the original nn.py.

    `scale=0` gives exact zeros (the original used 1e-10 because TF's
    initializer rejects 0); the layers that use it are the last of a residual
    branch, so every block starts as the identity and the UNet output starts
    identically zero.
    """
    if scale == 0.0:
        return jax.nn.initializers.zeros
    return jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def get_timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal timestep embedding, [B] -> [B, dim] float32.

    Vaswani et al. 2017, Sec. 3.5, in the tensor2tensor form used by Ho et al.
    2020 (Appendix B; `nn.get_timestep_embedding`): with h = dim // 2,
        emb[:, i]     = sin(t · 10000^(-i / (h - 1))),  i = 0 … h-1
        emb[:, h + i] = cos(t · 10000^(-i / (h - 1))),
    and one zero column appended when dim is odd. `t` may be int or float
    (respaced samplers pass original, possibly fractional, indices).
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got shape {t.shape}")
    if dim < 4:
        # h - 1 = 0 for dim in {2, 3}: the frequency ladder is undefined.
        raise ValueError(f"dim must be an int >= 4, got {dim}")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def conv3x3(features: int, name: str, dtype: Dtype, init_scale: float = 1.0, stride: int = 1) -> nn.Conv:
    """3×3 conv, 'SAME' padding. For stride 2 on even sizes lax pads (0, 1) like TF."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME",
                   kernel_init=default_init(init_scale), dtype=dtype, name=name)


def nin(features: int, name: str, dtype: Dtype, init_scale: float = 1.0) -> nn.Dense:
    """Network-in-network (1×1 conv) = dense over the channel axis, as `nn.nin`."""
    return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """Wide ResNet block with a timestep-embedding bias (Zagoruyko & Komodakis 2016).

    h = conv1(swish(GN(x))) + dense(swish(temb)); h = conv2(dropout(swish(GN(h))));
    out = shortcut(x) + h, where conv2 is zero-initialised and the shortcut is a
    1×1 conv ('nin_shortcut') only when the channel count changes.
    """

    out_ch: int
    dropout: float
    num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
        h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
        h = conv3x3(self.out_ch, "conv1", self.dtype)(h)
        h = h + nn.Dense(self.out_ch, kernel_init=default_init(), dtype=self.dtype,
                         name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_ch, "conv2", self.dtype, init_scale=0.0)(h)
        if x.shape[-1] != self.out_ch:
            x = nin(self.out_ch, "nin_shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, residual, zero-init output.

    Vaswani et al. 2017, eq. 1: softmax(q kᵀ / √C) v, with q, k, v 1×1 convs of
    GN(x); the softmax runs in float32 so bfloat16 logits do not saturate.
    """

    num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        q = nin(C, "q", self.dtype)(h).reshape(B, H * W, C)
        k = nin(C, "k", self.dtype)(h).reshape(B, H * W, C)
        v = nin(C, "v", self.dtype)(h).reshape(B, H * W, C)
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (C ** -0.5)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bij,bjc->bic", w, v).reshape(B, H, W, C)
        h = nin(C, "proj_out", self.dtype, init_scale=0.0)(h)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: strided 3×3 conv, or 2×2 average pooling without conv."""

    with_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return conv3x3(x.shape[-1], "conv", self.dtype, stride=2)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then (optionally) a 3×3 conv.

    At exactly 2× the original's TF1 nearest resize with align_corners=True
    picks source pixel round(y·(n-1)/(2n-1)) = y // 2, i.e. a plain repeat.
    """

    with_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = conv3x3(x.shape[-1], "conv", self.dtype)(x)
        return x
