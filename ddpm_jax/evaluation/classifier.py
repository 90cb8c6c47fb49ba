"""Offline sample-quality scores for 8x8 digits: FDD, digits IS and KID from a small CNN.

The default dataset (sklearn's 8x8 digits, [N, 8, 8, 1] in [-1, 1], 10
classes) is too small for the FID Inception network and no weights can be
downloaded here, so quality is measured with a classifier trained in seconds:
  FDD, "Fréchet Digits Distance": the Fréchet distance (Heusel et al. 2017,
      eq. 6) between Gaussians fitted to its penultimate features;
  digits IS: the Inception Score formula (Salimans et al. 2016, sec. 4) on its
      10-class softmax (at most 10);
  KID: the kernel distance (Bińkowski et al. 2018) on the same features.
These are NOT FID/IS/KID: the feature network, its dimension and the data
differ, so the numbers are not comparable with any published FID or IS. They
rank samples of the same data against each other, for one trained classifier
(fix its seed, or save it with save_classifier and reuse it).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ddpm_jax.evaluation import metrics

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """x [B, 8, 8, 1] in [-1, 1] -> (features [B, 64], logits [B, 10])."""

    @nn.compact
    def __call__(self, x):
        # swish rather than ReLU: no feature is exactly zero on a whole data set,
        # so the feature covariance of FDD stays full rank.
        x = nn.swish(nn.Conv(16, (3, 3), name="conv1")(x))
        x = nn.swish(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = nn.swish(nn.Dense(FEATURE_DIM, name="features")(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(NUM_CLASSES, name="logits")(features)


def _check_images(images):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] == 0:
        raise ValueError(f"images must have shape [N, 8, 8, 1] with N > 0; got {images.shape}.")
    return images


def _check_labels(labels, num_images):
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer) \
            or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be {num_images} integers in [0, {NUM_CLASSES}); "
                         f"got shape {labels.shape}, dtype {labels.dtype}.")
    return labels.astype(np.int32)


def _cross_entropy(params, images, labels):
    _, logits = DigitsClassifier().apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _random_shift(images, key):
    """Translates each image [B, 8, 8, 1] by -1, 0 or +1 pixel per axis, filling with background -1."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 3)
    crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), IMAGE_SHAPE)
    return jax.vmap(crop)(padded, offsets)


def train_feature_classifier(images, labels, *, rng, num_steps=300, batch_size=128, learning_rate=1e-3):
    """Trains DigitsClassifier with Adam on cross-entropy -> (params, train accuracy).

    images [N, 8, 8, 1] in [-1, 1], labels [N] in [0, 10); rng is a JAX key that
    sets the initialisation and the minibatches (drawn with replacement), so
    the same key gives the same classifier. Minibatches are randomly shifted
    by one pixel: sklearn's last 297 digits come from other writers, and the
    augmentation lifts accuracy there from about 93 % to about 95 %.
    """
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0])
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps and batch_size must be >= 1; got {num_steps}, {batch_size}.")
    init_key, batch_key, shift_key = jax.random.split(rng, 3)
    params = DigitsClassifier().init(init_key, jnp.zeros((1,) + IMAGE_SHAPE))["params"]
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    batch_indices = np.asarray(jax.random.randint(batch_key, (num_steps, batch_size), 0, images.shape[0]))

    @jax.jit
    def step(params, opt_state, batch_images, batch_labels, key):
        grads = jax.grad(_cross_entropy)(params, _random_shift(batch_images, key), batch_labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A Python loop over a jitted step, not lax.scan: XLA:CPU ran the same
    # steps inside a scan body an order of magnitude slower (minutes, not seconds).
    for i, indices in enumerate(batch_indices):
        params, opt_state = step(params, opt_state, images[indices], labels[indices],
                                 jax.random.fold_in(shift_key, i))
    return params, classifier_accuracy(params, images, labels)


@jax.jit
def _apply(params, images):
    return DigitsClassifier().apply({"params": params}, images)


def classifier_features(params, images, batch_size=1024):
    """images [N, 8, 8, 1] in [-1, 1] -> (features [N, 64], logits [N, 10]) as NumPy arrays."""
    images = _check_images(images)
    outputs = [_apply(params, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return (np.concatenate([np.asarray(f) for f, _ in outputs]),
            np.concatenate([np.asarray(l) for _, l in outputs]))


def classifier_accuracy(params, images, labels):
    """Fraction of images whose argmax logit equals the label."""
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0])
    _, logits = classifier_features(params, images)
    return float(np.mean(logits.argmax(axis=1) == labels))


def digits_sample_quality(params, samples, reference_images, *, rng, num_splits=10,
                          kid_subsets=100, kid_subset_size=None, ref_features=None):
    """FDD, digits IS and KID of samples against reference images (both [N, 8, 8, 1]).

    Returns {"fdd", "is_mean", "is_std", "kid_mean", "kid_std"}; the IS is of
    the samples alone. rng: np.random.Generator for the KID subsets;
    kid_subset_size None means min(1000, N_samples, N_reference). ref_features:
    the reference images' features when already computed (reference_images is then unused).
    """
    gen_features, gen_logits = classifier_features(params, samples)
    if ref_features is None:
        ref_features, _ = classifier_features(params, reference_images)
    if kid_subset_size is None:
        kid_subset_size = min(1000, len(gen_features), len(ref_features))
    is_mean, is_std = metrics.inception_score(gen_logits, num_splits)
    kid_mean, kid_std = metrics.kernel_inception_distance(
        ref_features, gen_features, rng=rng, num_subsets=kid_subsets, subset_size=kid_subset_size)
    fdd = metrics.frechet_distance(*metrics.feature_statistics(ref_features),
                                   *metrics.feature_statistics(gen_features))
    return {"fdd": fdd, "is_mean": is_mean, "is_std": is_std, "kid_mean": kid_mean, "kid_std": kid_std}


def save_classifier(path, params):
    """Writes params to an .npz, one array per "module/param" name."""
    np.savez(path, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})


def load_classifier(path):
    """Reads params written by save_classifier; ValueError if they are not DigitsClassifier's."""
    with np.load(path) as npz:
        flat = {k: jnp.asarray(npz[k]) for k in npz.files}
    expected = jax.eval_shape(DigitsClassifier().init, jax.random.key(0), jnp.zeros((1,) + IMAGE_SHAPE))
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(expected["params"], sep="/").items()}
    if {k: v.shape for k, v in flat.items()} != expected:
        raise ValueError(f"{path} does not hold DigitsClassifier params; expected {expected}.")
    return traverse_util.unflatten_dict(flat, sep="/")
