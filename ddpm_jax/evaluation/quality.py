"""Sample quality for the σ_t ablation and beyond: FID/IS/KID on Inception features, or the offline
digits stand-ins (FDD/KID/IS on a small classifier's features, `classifier.py`).

Each `*_quality_fn` returns score(samples, seed) -> {metric: value}; samples are quantized
onto the 8-bit grid first, as saving them to PNG would (the reference data are on it).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from ddpm_jax.evaluation import classifier, inception, metrics

QUALITY_KINDS = ("auto", "digits", "inception", "none")


def quantize(images: np.ndarray) -> np.ndarray:
    """Samples rounded to the 8-bit grid, as saving them to PNG would (the reference data are on it)."""
    return (np.clip(np.round((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255) / 127.5 - 1.0).astype(np.float32)


def resolve_quality_kind(kind: str, dataset: str, inception_weights: str | None) -> str:
    """'auto': FID/IS/KID when an Inception weights file is given, else the digits classifier for digits, else none."""
    if kind != "auto":
        return kind
    if inception_weights:
        return "inception"
    return "digits" if dataset == "digits" else "none"


def digits_reference(train_images, train_labels, reference_images, *, seed: int,
                     classifier_steps: int) -> dict[str, np.ndarray]:
    """What the digits metrics cost to prepare, as arrays a cache can keep: the feature classifier trained on
    the training split ('params/<module>/<name>') and the reference images' features ('ref_features')."""
    params, accuracy = classifier.train_feature_classifier(train_images, train_labels, rng=jax.random.PRNGKey(seed),
                                                           num_steps=classifier_steps)
    logging.info("Digits feature classifier: train accuracy %.3f", accuracy)
    ref_features, _ = classifier.classifier_features(params, reference_images)
    flat = traverse_util.flatten_dict(params, sep="/")
    return {**{f"params/{k}": np.asarray(v) for k, v in flat.items()}, "ref_features": np.asarray(ref_features)}


def digits_quality_fn_from(reference: dict[str, np.ndarray], *,
                           kid_subsets: int) -> Callable[[np.ndarray, int], dict[str, float]]:
    """score(samples [N, 8, 8, 1], seed) -> {fdd, kid, digits_is} from `digits_reference`'s arrays."""
    params = traverse_util.unflatten_dict({k[len("params/"):]: jax.numpy.asarray(v) for k, v in reference.items()
                                           if k.startswith("params/")}, sep="/")
    ref_features = reference["ref_features"]

    def score(samples, seed):
        m = classifier.digits_sample_quality(params, quantize(samples), None, ref_features=ref_features,
                                             rng=np.random.default_rng(seed), kid_subsets=kid_subsets)
        return {"fdd": m["fdd"], "kid": m["kid_mean"], "digits_is": m["is_mean"]}

    return score


def inception_reference(reference_images, *, weights: str | None) -> dict[str, np.ndarray]:
    """The reference images' FID-Inception features ('ref_features'), as arrays a cache can keep."""
    ref_features, _ = inception.inception_features(inception.load_inception_variables(weights), reference_images)
    return {"ref_features": np.asarray(ref_features)}


def inception_quality_fn(reference_images, *, weights: str | None, kid_subsets: int,
                         reference: dict[str, np.ndarray] | None = None) -> Callable[[np.ndarray, int], dict[str, float]]:
    """score(samples, seed) -> {fid, kid, inception_is} on FID-Inception features (Heusel et al. 2017).

    reference: `inception_reference`'s arrays when already computed (reference_images is then unused).
    """
    variables = inception.load_inception_variables(weights)
    if reference is None:
        reference = inception_reference(reference_images, weights=weights)
    ref_features = reference["ref_features"]
    ref_stats = metrics.feature_statistics(ref_features)

    def score(samples, seed):
        features, logits = inception.inception_features(variables, quantize(samples))
        subset = min(1000, len(features), len(ref_features))
        kid, _ = metrics.kernel_inception_distance(ref_features, features, rng=np.random.default_rng(seed),
                                                   num_subsets=kid_subsets, subset_size=subset)
        is_mean, _ = metrics.inception_score(logits, num_splits=min(10, len(logits)))
        return {"fid": metrics.frechet_distance(*ref_stats, *metrics.feature_statistics(features)),
                "kid": kid, "inception_is": is_mean}

    return score
