"""The DDPM UNet (Ho et al. 2020, Appendix B), after `diffusion_tf/models/unet.py`.

PixelCNN++-style UNet: per level `num_res_blocks` wide ResNet blocks with
channels ch · ch_mult[level], self-attention at the resolutions in
`attn_resolutions`, conv resampling between levels, a middle
ResNet/attention/ResNet stage, and an up path that concatenates every
down-path activation (skip connection) before its ResNet block. The timestep
enters every ResNet block through a sinusoidal embedding and a 2-layer MLP of
width 4·ch. Parameter names follow the original (`temb_dense0`, `down_0_block_0`,
`mid_attn_1`, `conv_out`, …).
"""

import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import (AttnBlock, Downsample, ResnetBlock, Upsample, conv3x3,
                                    default_init, get_timestep_embedding)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_unet_config(image_size: int, ch: int, ch_mult: Sequence[int],
                      attn_resolutions: Sequence[int], num_groups: int, *,
                      num_res_blocks: int = 2, dropout: float = 0.0,
                      out_channels: int = 3) -> None:
    """Raise one ValueError naming the field if the UNet cannot be built for this input.

    Call it where the config enters (before `init` or any jit) so a bad config
    fails in milliseconds rather than inside a trace. The UNet halves the image
    len(ch_mult) - 1 times, so image_size must be divisible by 2**(len(ch_mult)-1);
    GroupNorm normalises the `ch` channels of conv_in (and every multiple of ch
    after it), so ch must be divisible by num_groups.
    """
    if not _is_int(ch) or ch < 4:
        raise ValueError(f"ch must be an int >= 4 (it is also the timestep-embedding dim), got {ch!r}")
    if len(ch_mult) == 0 or not all(_is_int(m) and m >= 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of ints >= 1, got {tuple(ch_mult)!r}")
    if not _is_int(num_res_blocks) or num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be an int >= 1, got {num_res_blocks!r}")
    if not _is_int(num_groups) or num_groups < 1 or ch % num_groups != 0:
        divisors = [g for g in range(1, min(ch, 32) + 1) if ch % g == 0]
        raise ValueError(f"num_groups must be an int >= 1 dividing ch={ch} (GroupNorm over every "
                         f"multiple of ch), e.g. one of {divisors}; got {num_groups!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not _is_int(out_channels) or out_channels < 1:
        raise ValueError(f"out_channels must be an int >= 1, got {out_channels!r}")
    factor = 2 ** (len(ch_mult) - 1)
    if not _is_int(image_size) or image_size < factor or image_size % factor != 0:
        raise ValueError(f"image_size must be a positive multiple of 2**(len(ch_mult)-1) = {factor} "
                         f"(len(ch_mult) = {len(ch_mult)}), got {image_size!r}")
    resolutions = [image_size // 2 ** level for level in range(len(ch_mult))]
    unused = [r for r in attn_resolutions if r not in resolutions]
    if unused:
        raise ValueError(f"attn_resolutions must be a subset of the resolutions {resolutions} "
                         f"that occur for image_size={image_size}, ch_mult={tuple(ch_mult)}; "
                         f"{unused} never occur")


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree (arrays or jax.ShapeDtypeStruct)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


class UNet(nn.Module):
    """ε-prediction UNet: x [B, S, S, C], t [B] -> [B, S, S, out_channels] float32.

    Ho et al. 2020, Appendix B. Defaults are the CIFAR-10 model (35.7M params).
    For a learned variance set out_channels = 2C (first C channels = ε, last C = v).
    `dtype` is the computation dtype; parameters stay float32 and the output is
    cast back to float32. Dropout draws from the 'dropout' rng collection and is
    active only with train=True. `t` is the zero-based timestep index (int or float).
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    out_channels: int = 3
    num_groups: int = 32
    resamp_with_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f"x must have shape [B, S, S, C] (square images), got {x.shape}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B] = ({x.shape[0]},), got {t.shape}")
        check_unet_config(x.shape[1], self.ch, self.ch_mult, self.attn_resolutions, self.num_groups,
                          num_res_blocks=self.num_res_blocks, dropout=self.dropout,
                          out_channels=self.out_channels)
        block = dict(dropout=self.dropout, num_groups=self.num_groups, dtype=self.dtype)
        num_levels = len(self.ch_mult)

        # Timestep embedding: sinusoid of width ch, then a 2-layer MLP of width 4·ch.
        temb = get_timestep_embedding(t, self.ch)
        temb = nn.Dense(4 * self.ch, kernel_init=default_init(), dtype=self.dtype, name="temb_dense0")(temb)
        temb = nn.Dense(4 * self.ch, kernel_init=default_init(), dtype=self.dtype,
                        name="temb_dense1")(nn.swish(temb))

        # Down path; every activation is kept for a skip connection.
        hs = [conv3x3(self.ch, "conv_in", self.dtype)(x.astype(self.dtype))]
        for level in range(num_levels):
            for i in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * self.ch_mult[level], name=f"down_{level}_block_{i}",
                                **block)(hs[-1], temb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.num_groups, self.dtype, name=f"down_{level}_attn_{i}")(h)
                hs.append(h)
            if level != num_levels - 1:
                hs.append(Downsample(self.resamp_with_conv, self.dtype,
                                     name=f"down_{level}_downsample")(hs[-1]))

        # Middle: attention always runs at the lowest resolution, as in the original.
        h = hs[-1]
        h = ResnetBlock(h.shape[-1], name="mid_block_1", **block)(h, temb, train=train)
        h = AttnBlock(self.num_groups, self.dtype, name="mid_attn_1")(h)
        h = ResnetBlock(h.shape[-1], name="mid_block_2", **block)(h, temb, train=train)

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[level], name=f"up_{level}_block_{i}",
                                **block)(jnp.concatenate([h, hs.pop()], axis=-1), temb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.num_groups, self.dtype, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{level}_upsample")(h)
        assert not hs, "every down-path activation must be consumed by the up path"

        h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(h))
        h = conv3x3(self.out_channels, "conv_out", self.dtype, init_scale=0.0)(h)
        chex.assert_shape(h, (*x.shape[:3], self.out_channels))
        return h.astype(jnp.float32)
