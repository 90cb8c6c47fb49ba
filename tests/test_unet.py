"""Tests of the DDPM UNet against the paper's parameter counts, a closed-form
parameter count, a float64 NumPy timestep embedding, and the original code's
initialisation (zero-init residual branches → zero output at init)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import UNet, check_unet_config, count_params, get_timestep_embedding

# Tiny model used for everything that runs: 8×8 RGB, two levels (8, 4), attention
# at 4, a channel change (16 → 32, so a nin_shortcut), learned variance (2C out).
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            dropout=0.1, out_channels=6, num_groups=4)
B, S, C = 4, 8, 3


def abstract_params(model, image_size, channels=3):
    """Parameter shapes via eval_shape: nothing is allocated or compiled."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(lambda k, x, t: model.init(k, x, t, train=False), jax.random.key(0), x, t)["params"]


def closed_form_param_count(ch, ch_mult, num_res_blocks, attn_resolutions, image_size,
                            in_ch, out_ch, resamp_with_conv):
    """Parameter count of Ho et al.'s UNet, summed layer by layer from the original code."""
    conv3 = lambda i, o: 9 * i * o + o
    dense = lambda i, o: i * o + o
    norm = lambda c: 2 * c
    res = lambda i, o: (norm(i) + conv3(i, o) + dense(4 * ch, o) + norm(o) + conv3(o, o)
                        + (dense(i, o) if i != o else 0))
    attn = lambda c: norm(c) + 4 * dense(c, c)
    total = dense(ch, 4 * ch) + dense(4 * ch, 4 * ch) + conv3(in_ch, ch)
    skips, cur, size = [ch], ch, image_size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            total += res(cur, ch * mult) + (attn(ch * mult) if size in attn_resolutions else 0)
            cur = ch * mult
            skips.append(cur)
        if level != len(ch_mult) - 1:
            total += conv3(cur, cur) if resamp_with_conv else 0
            skips.append(cur)
            size //= 2
    total += 2 * res(cur, cur) + attn(cur)
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += res(cur + skips.pop(), ch * mult) + (attn(ch * mult) if size in attn_resolutions else 0)
            cur = ch * mult
        if level != 0:
            total += conv3(cur, cur) if resamp_with_conv else 0
            size *= 2
    return total + norm(cur) + conv3(cur, out_ch)


def test_cifar10_param_count_matches_paper():
    """Ho et al. 2020, Sec. 4: the CIFAR-10 model has 35.7M parameters."""
    n = count_params(abstract_params(UNet(), 32))
    print(f"CIFAR-10 UNet parameters: {n:,}")
    assert n == 35_746_307
    assert abs(n - 35.7e6) / 35.7e6 < 0.005


def test_256_param_count_matches_paper():
    """Ho et al. 2020, Sec. 4: the 256×256 (CelebA-HQ/LSUN) models have 114M parameters."""
    model = UNet(ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,))
    n = count_params(abstract_params(model, 256))
    print(f"256x256 UNet parameters: {n:,}")
    assert n == 113_673_219
    assert abs(n - 114e6) / 114e6 < 0.005


@pytest.mark.parametrize("kw, image_size", [
    (dict(), 32),
    (dict(ch_mult=(1, 1, 2, 2, 4, 4)), 256),
    (dict(TINY), 8),
    (dict(TINY, resamp_with_conv=False, num_res_blocks=2, attn_resolutions=(8, 4)), 8),
    (dict(ch=32, ch_mult=(1, 2, 3), attn_resolutions=(), out_channels=2, num_groups=8), 16),
])
def test_param_count_matches_closed_form(kw, image_size):
    model = UNet(**kw)
    expected = closed_form_param_count(model.ch, model.ch_mult, model.num_res_blocks,
                                       model.attn_resolutions, image_size, 3,
                                       model.out_channels, model.resamp_with_conv)
    assert count_params(abstract_params(model, image_size)) == expected


def numpy_timestep_embedding(t, dim):
    """Ho et al.'s nn.get_timestep_embedding, written per entry in float64."""
    half = dim // 2
    emb = np.zeros((len(t), dim))
    for b, tb in enumerate(np.asarray(t, np.float64)):
        for i in range(half):
            freq = 10000.0 ** (-i / (half - 1))
            emb[b, i], emb[b, half + i] = math.sin(tb * freq), math.cos(tb * freq)
    return emb


@pytest.mark.parametrize("dim", [4, 16, 33, 128])
def test_timestep_embedding_matches_numpy(dim):
    t = np.array([0, 1, 17, 500, 999], np.int32)
    got = np.asarray(get_timestep_embedding(jnp.asarray(t), dim))
    assert got.shape == (len(t), dim) and got.dtype == np.float32
    # float32 phase t·freq carries ~1e-4 absolute error at t ≈ 1000.
    np.testing.assert_allclose(got, numpy_timestep_embedding(t, dim), atol=2e-4, rtol=0)
    np.testing.assert_array_equal(get_timestep_embedding(jnp.asarray(t, jnp.float32), dim), got)


def test_timestep_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        get_timestep_embedding(jnp.zeros((2,), jnp.int32), 3)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        get_timestep_embedding(jnp.zeros((2, 1), jnp.int32), 16)


def fast_compile(fn, *args):
    """jit + compile with XLA backend optimisation off: same semantics, 2-4× less
    compile time on CPU, and these tiny models run in milliseconds either way."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def images(seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (B, S, S, C)), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
    """Tiny model, its initial params, params with every leaf perturbed, compiled applies.

    Init uses the 'rbg' key implementation: with the default threefry the init
    takes ~20 s to compile on CPU; the law of the initial values is the same.
    """
    model = UNet(**TINY)
    x, t = images(), jnp.zeros((B,), jnp.int32)
    key = jax.random.key(0, impl="rbg")
    params = fast_compile(lambda k: model.init(k, x, t, train=False), key)(key)["params"]
    rng = np.random.default_rng(0)
    perturbed = jax.tree_util.tree_map(
        lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(np.float32), params)
    # Both take a dropout key so that train=False can be shown to ignore it.
    apply = lambda train: fast_compile(lambda p, x, t, k: model.apply(
        {"params": p}, x, t, train=train, rngs={"dropout": k}), params, x, t, jax.random.key(0))
    return dict(model=model, params=params, perturbed=perturbed, eval=apply(False), train=apply(True))


def test_output_is_zero_at_init_for_learned_variance_shape(tiny):
    """Zero-init conv_out (init_scale=0 in the original) → the model starts at ε̂ ≡ 0."""
    out = tiny["eval"](tiny["params"], images(), jnp.array([0, 1, 500, 999]), jax.random.key(0))
    assert out.shape == (B, S, S, 2 * C) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_initialisation_follows_original(tiny):
    """Residual-branch ends (conv2, proj_out, conv_out) are zero; other kernels are
    variance-scaling fan_avg uniform: U(±√(3/fan_avg)), variance 1/fan_avg."""
    flat = jax.tree_util.tree_flatten_with_path(tiny["params"])[0]
    names = {"/".join(k.key for k in path): np.asarray(v) for path, v in flat}
    zero_init = [n for n in names if n.endswith("kernel") and
                 any(f"{z}/kernel" in n for z in ("conv2", "proj_out", "conv_out"))]
    # 8 ResNet blocks (2 down, 2 mid, 4 up), 4 attention blocks (down_1, mid, 2 × up_1), conv_out.
    assert len(zero_init) == 8 + 4 + 1
    for n in zero_init:
        np.testing.assert_array_equal(names[n], 0.0, err_msg=n)
    for n, v in names.items():
        if n.endswith("bias"):
            np.testing.assert_array_equal(v, 0.0, err_msg=n)
        elif n.endswith("scale"):
            np.testing.assert_array_equal(v, 1.0, err_msg=n)
    w = names["down_1_block_0/conv1/kernel"]  # [3, 3, 16, 32]
    fan_avg = 9 * (16 + 32) / 2
    assert np.abs(w).max() <= math.sqrt(3 / fan_avg)
    assert abs(w.var() * fan_avg - 1.0) < 0.1  # 4608 samples: std of the ratio ≈ 0.013


def test_output_depends_on_t_per_example(tiny):
    """Identical images with t = [0, 0, 500, 999]: equal t → equal rows, else different."""
    x = jnp.broadcast_to(images()[:1], (B, S, S, C))
    out = np.asarray(tiny["eval"](tiny["perturbed"], x, jnp.array([0, 0, 500, 999]), jax.random.key(0)))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)
    scale = np.abs(out).mean()
    assert scale > 0
    assert np.abs(out[0] - out[2]).mean() > 1e-2 * scale
    assert np.abs(out[2] - out[3]).mean() > 1e-2 * scale


def test_dropout_only_with_train(tiny):
    """train=False ignores the 'dropout' key; train=True draws a mask from it."""
    x, t = images(), jnp.array([3, 3, 3, 3])
    p = tiny["perturbed"]
    eval_out = tiny["eval"](p, x, t, jax.random.key(0))
    np.testing.assert_array_equal(eval_out, tiny["eval"](p, x, t, jax.random.key(9)))
    a = tiny["train"](p, x, t, jax.random.key(1))
    np.testing.assert_array_equal(a, tiny["train"](p, x, t, jax.random.key(1)))
    for other in (tiny["train"](p, x, t, jax.random.key(2)), eval_out):
        assert np.abs(np.asarray(a) - np.asarray(other)).mean() > 1e-3 * np.abs(eval_out).mean()


def test_bfloat16_compute_close_to_float32(tiny):
    model = tiny["model"].clone(dtype=jnp.bfloat16)
    x, t = images(), jnp.array([0, 10, 500, 999])
    params_dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract_params(model, S))}
    assert params_dtypes == {jnp.dtype(jnp.float32)}
    p = tiny["perturbed"]
    out = fast_compile(lambda p: model.apply({"params": p}, x, t, train=False), p)(p)
    ref = tiny["eval"](p, x, t, jax.random.key(0))
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 5e-2  # bfloat16 has an 8-bit mantissa: ~1e-2 relative error, not 0


GOOD = dict(image_size=32, ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), num_groups=32)


@pytest.mark.parametrize("change, field", [
    (dict(image_size=36), "image_size"),          # 36 is not a multiple of 2**3
    (dict(image_size=4), "image_size"),
    (dict(ch=96, num_groups=64), "num_groups"),
    (dict(ch=48), "num_groups"),                  # 48 % 32 != 0
    (dict(ch=2, num_groups=1), "ch"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(ch_mult=(1, 0)), "ch_mult"),
    (dict(attn_resolutions=(16, 3)), "attn_resolutions"),
    (dict(attn_resolutions=(64,)), "attn_resolutions"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dropout=1.0), "dropout"),
    (dict(out_channels=0), "out_channels"),
])
def test_check_unet_config_names_the_field(change, field):
    check_unet_config(**GOOD)
    with pytest.raises(ValueError, match=f"^{field} must"):
        check_unet_config(**{**GOOD, **change})


def test_unet_rejects_bad_inputs_before_compiling():
    model = UNet(**TINY)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    init = lambda x, t: jax.eval_shape(lambda k, x, t: model.init(k, x, t, train=False),
                                       jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="^image_size must"):
        init(jax.ShapeDtypeStruct((2, 7, 7, 3), jnp.float32), t)  # 7 cannot be halved
    with pytest.raises(ValueError, match=r"^x must have shape \[B, S, S, C\]"):
        init(jax.ShapeDtypeStruct((2, 8, 16, 3), jnp.float32), t)
    with pytest.raises(ValueError, match=r"^t must have shape \[B\]"):
        init(jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((2, 1), jnp.int32))
