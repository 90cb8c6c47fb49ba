"""The FID Inception-v3 network in Flax: pool_3 features [N, 2048] and logits [N, 1008].

Architecture: TensorFlow's 2015 Inception graph (inception-2015-12-05.tgz)
that TTUR's FID, improved-gan's IS and pytorch-fid use, i.e. torchvision's
Inception3 (aux head removed, 1008 classes) with pytorch-fid's patches:
FIDInceptionA/C/E_1 average-pool without counting the zero padding, and
FIDInceptionE_2 (Mixed_7c) max-pools in its pool branch.

Weight file format (the only one accepted): an uncompressed or compressed
`.npz` whose entries are the pytorch-fid state_dict of
`pt_inception-2015-12-05-6726825d.pth`, one array per key, with the key
names (e.g. "Mixed_5b.branch1x1.conv.weight") and PyTorch layouts (conv
weights [O, I, kH, kW], fc.weight [1008, 2048]) unchanged;
"*.num_batches_tracked" entries are ignored. Make it with
`python scripts/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.npz`
and point to it with `load_inception_variables(path)` or the environment
variable DDPM_JAX_FID_WEIGHTS. Nothing is downloaded at run time.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_ENV_VAR = "DDPM_JAX_FID_WEIGHTS"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008  # The 2015 graph has 1008 outputs (1000 ImageNet classes + 8 unused).


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel_size: tuple = (1, 1)
    strides: int = 1
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=[(p, p) for p in self.padding], use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # TF's average pool divides by the number of non-padding inputs (pytorch-fid's patch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride):
    pad = 1 if stride == 1 else 0
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 35x35 block (pytorch-fid FIDInceptionA)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        branch1x1 = BasicConv2d(64, name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 reduction."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e: 17x17 block with factorized 7x7 convolutions (FIDInceptionC)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        branch1x1 = BasicConv2d(192, name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, **row, name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, **col, name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv2d(c7, **col, name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, **row, name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, **col, name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(192, **row, name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8 reduction."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = BasicConv2d(192, name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (pool="avg", FIDInceptionE_1) and Mixed_7c (pool="max", FIDInceptionE_2)."""

    pool: str

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        branch1x1 = BasicConv2d(320, name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(branch3x3),
                                     BasicConv2d(384, **col, name="branch3x3_2b")(branch3x3)], axis=-1)
        branch3x3dbl = BasicConv2d(448, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(branch3x3dbl),
                                        BasicConv2d(384, **col, name="branch3x3dbl_3b")(branch3x3dbl)],
                                       axis=-1)
        # The 2015 graph max-pools in Mixed_7c, unlike the paper (see pytorch-fid's FIDInceptionE_2).
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
        branch_pool = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """x [B, 299, 299, 3] in [-1, 1] -> (pool_3 [B, 2048], logits [B, 1008]).

    The logits are pool_3 @ fc.weight.T without fc.bias: the original IS code
    (Salimans et al. 2016, improved-gan) reads the input of the
    "softmax/logits/MatMul" op, before the bias add ("logits_unbiased" in
    torch-fidelity). fc.bias is still a parameter so that the variables map
    one-to-one onto the pytorch-fid state_dict.
    """

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, name="fc")
        fc(pool)  # creates fc.kernel and fc.bias
        return pool, pool @ fc.variables["params"]["kernel"]


# --- pytorch-fid state_dict <-> Flax variables ------------------------------------

# (collection, last two Flax path entries) -> (PyTorch suffix, Flax-from-PyTorch layout transpose)
_LEAF_NAMES = {
    ("params", ("conv", "kernel")): ("conv.weight", (2, 3, 1, 0)),  # OIHW -> HWIO
    ("params", ("bn", "scale")): ("bn.weight", None),
    ("params", ("bn", "bias")): ("bn.bias", None),
    ("batch_stats", ("bn", "mean")): ("bn.running_mean", None),
    ("batch_stats", ("bn", "var")): ("bn.running_var", None),
    ("params", ("fc", "kernel")): ("fc.weight", (1, 0)),  # [out, in] -> [in, out]
    ("params", ("fc", "bias")): ("fc.bias", None),
}


def _torch_key(collection, path):
    suffix, transpose = _LEAF_NAMES[(collection, tuple(path[-2:]))]
    return ".".join(list(path[:-2]) + [suffix]), transpose


@functools.lru_cache(maxsize=1)
def _variable_shapes():
    """{(collection, path): shape} of InceptionV3's variables, from tracing only."""
    variables = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                               jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        names = tuple(entry.key for entry in path)
        flat[(names[0], names[1:])] = tuple(leaf.shape)
    return flat


def variables_to_state_dict(variables):
    """Flax variables of InceptionV3 -> {pytorch-fid key: array in PyTorch layout}."""
    state_dict = {}
    for collection, path in _variable_shapes():
        leaf = variables[collection]
        for name in path:
            leaf = leaf[name]
        key, transpose = _torch_key(collection, path)
        leaf = np.asarray(leaf)
        state_dict[key] = leaf if transpose is None else leaf.transpose(np.argsort(transpose))
    return state_dict


def state_dict_to_variables(state_dict):
    """{pytorch-fid key: array} -> Flax variables; ValueError on missing/extra keys or bad shapes."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    variables, expected_keys = {}, set()
    for (collection, path), shape in _variable_shapes().items():
        key, transpose = _torch_key(collection, path)
        expected_keys.add(key)
        if key not in state_dict:
            continue
        leaf = np.asarray(state_dict[key], dtype=np.float32)
        leaf = leaf if transpose is None else leaf.transpose(transpose)
        if leaf.shape != shape:
            torch_shape = shape if transpose is None else tuple(shape[i] for i in np.argsort(transpose))
            raise ValueError(f"FID Inception weight {key!r} has shape {np.shape(state_dict[key])}; "
                             f"pytorch-fid's has shape {torch_shape}.")
        node = variables.setdefault(collection, {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(leaf)
    missing, unexpected = sorted(expected_keys - set(state_dict)), sorted(set(state_dict) - expected_keys)
    if missing or unexpected:
        raise ValueError(f"FID Inception weights do not match the pytorch-fid state_dict: "
                         f"missing {missing[:5]} ({len(missing)} in all), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)} in all).")
    return variables


def load_inception_variables(path=None):
    """Loads the FID Inception variables from the .npz described in the module docstring.

    path: the .npz file; None reads the environment variable DDPM_JAX_FID_WEIGHTS.
    """
    source = "the `path` argument"
    if path is None:
        path, source = os.environ.get(WEIGHTS_ENV_VAR), f"${WEIGHTS_ENV_VAR}"
    if not path or not os.path.isfile(path):
        where = f"{path!r} (from {source})" if path else f"nowhere: neither `path` nor ${WEIGHTS_ENV_VAR} is set"
        raise FileNotFoundError(
            f"FID Inception weights not found: looked {where}. Download {WEIGHTS_URL}, convert "
            f"it with `python scripts/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth "
            f"fid_inception.npz` (needs torch), then pass path='fid_inception.npz' or set "
            f"{WEIGHTS_ENV_VAR}=/abs/path/fid_inception.npz.")
    if str(path).endswith(".pth"):
        raise ValueError(f"{path} is the PyTorch file; convert it first with "
                         "`python scripts/convert_fid_inception.py IN.pth OUT.npz` and load the .npz.")
    with np.load(path) as npz:
        return state_dict_to_variables(dict(npz))


# --- feature extraction -------------------------------------------------------------

def preprocess(images):
    """[B, H, W, C] in [-1, 1], C in {1, 3} -> [B, 299, 299, 3].

    Bilinear resize without antialiasing, as pytorch-fid's
    F.interpolate(mode="bilinear", align_corners=False); grayscale is
    repeated over the 3 channels.
    """
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3)
    return jax.image.resize(images, shape, method="bilinear", antialias=False)


@jax.jit
def _features_batch(variables, images):
    return InceptionV3().apply(variables, preprocess(images))


def inception_features(variables, images, batch_size=50):
    """images [N, H, W, C] in [-1, 1] (C = 1 or 3) -> (pool_3 [N, 2048], logits [N, 1008]).

    Runs in batches of batch_size (the last one padded, so one compilation);
    returns float32 NumPy arrays. For numbers comparable with published FIDs,
    quantize samples to 8 bits first, as saving them to PNG would.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, C] with C in (1, 3); got {images.shape}.")
    if images.shape[0] == 0 or batch_size < 1:
        raise ValueError(f"images must be non-empty and batch_size >= 1; got N={images.shape[0]}, "
                         f"batch_size={batch_size}.")
    batch_size = min(batch_size, images.shape[0])
    pools, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], np.float32)])
        pool, logit = _features_batch(variables, padded)
        pools.append(np.asarray(pool)[:len(batch)])
        logits.append(np.asarray(logit)[:len(batch)])
    return np.concatenate(pools), np.concatenate(logits)
