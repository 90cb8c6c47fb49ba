"""Tests for ddpm_jax/evaluation/metrics.py (FID / IS / KID) and classifier.py (FDD on digits).

References are independent: closed forms for Gaussians, one-hot and
uniform predictions, an eigh-based symmetric square root, and explicit loops.
"""

import jax
import numpy as np
import pytest
from scipy import special
from sklearn.datasets import load_digits

from ddpm_jax.evaluation import classifier, metrics


def _random_covariance(rng, dim):
    a = rng.normal(size=(dim, 2 * dim))
    return a @ a.T / (2 * dim)


def _psd_sqrt(matrix):
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _frechet_reference(mu1, sigma1, mu2, sigma2):
    """Tr((sigma1 sigma2)^{1/2}) = Tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2}), all symmetric."""
    root1 = _psd_sqrt(sigma1)
    cross = np.trace(_psd_sqrt(root1 @ sigma2 @ root1))
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross


# --- Fréchet distance ------------------------------------------------------------------

def test_feature_statistics_matches_explicit_sums():
    features = np.random.default_rng(0).normal(size=(50, 4))
    mu, sigma = metrics.feature_statistics(features)
    centered = features - features.sum(axis=0) / 50
    np.testing.assert_allclose(mu, features.sum(axis=0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-12)


def test_frechet_distance_diagonal_closed_form():
    """Diagonal covariances: d² = |Δμ|² + Σ_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))."""
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_of_two_gaussians_matches_symmetric_form():
    rng = np.random.default_rng(2)
    dim = 12
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    chol_a = np.linalg.cholesky(_random_covariance(rng, dim))
    chol_b = np.linalg.cholesky(_random_covariance(rng, dim))
    stats_a = metrics.feature_statistics(mu_a + rng.normal(size=(500, dim)) @ chol_a.T)
    stats_b = metrics.feature_statistics(mu_b + rng.normal(size=(500, dim)) @ chol_b.T)
    np.testing.assert_allclose(metrics.frechet_distance(*stats_a, *stats_b),
                               _frechet_reference(*stats_a, *stats_b), rtol=1e-8)


def test_frechet_distance_of_identical_statistics_is_zero():
    stats = metrics.feature_statistics(np.random.default_rng(3).normal(size=(200, 16)))
    assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-8


def test_frechet_distance_retries_singular_product_with_eps(monkeypatch):
    """When sqrtm is not finite, the distance uses sigma + eps·I inside the square root."""
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    sigma1, sigma2 = _random_covariance(rng, 5), _random_covariance(rng, 5)
    real_sqrtm, calls = metrics.linalg.sqrtm, []

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", sqrtm_failing_once)
    eps = 1e-2
    with pytest.warns(UserWarning, match="singular"):
        got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    offset = eps * np.eye(5)
    root1 = _psd_sqrt(sigma1 + offset)
    cross = np.trace(_psd_sqrt(root1 @ (sigma2 + offset) @ root1))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_distance_with_more_dimensions_than_samples_is_finite():
    rng = np.random.default_rng(5)
    stats_a = metrics.feature_statistics(rng.normal(size=(10, 40)))
    stats_b = metrics.feature_statistics(rng.normal(size=(10, 40)))
    np.testing.assert_allclose(metrics.frechet_distance(*stats_a, *stats_b),
                               _frechet_reference(*stats_a, *stats_b), rtol=1e-4)


def test_frechet_distance_rejects_non_covariances_and_bad_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.feature_statistics(np.zeros(5))


# --- Inception Score -------------------------------------------------------------------

def test_inception_score_of_uniform_predictions_is_one():
    assert metrics.inception_score(np.zeros((100, 7))) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_num_classes():
    """One-hot p(y|x), every class equally often in every split: KL = log K, IS = K."""
    num_classes, num_splits = 6, 5
    labels = np.tile(np.arange(num_classes), num_splits)
    with np.errstate(divide="ignore"):
        log_probs = np.log(np.eye(num_classes)[labels])
    assert metrics.inception_score(log_probs, num_splits) == pytest.approx((num_classes, 0.0), abs=1e-9)


def test_inception_score_of_pairwise_uniform_predictions_is_half_num_classes():
    """p(y|x) uniform on a pair {2j, 2j+1}, pairs balanced: KL = log(K/2)."""
    num_classes = 8
    pairs = np.repeat(np.arange(num_classes // 2), 2)
    probs = (pairs[None, :] == np.arange(num_classes // 2)[:, None]) / 2.0
    with np.errstate(divide="ignore"):
        log_probs = np.log(np.tile(probs, (10, 1)))
    mean, _ = metrics.inception_score(log_probs, num_splits=2)
    np.testing.assert_allclose(mean, num_classes / 2, rtol=1e-12)


def test_inception_score_matches_explicit_loop():
    logits = np.random.default_rng(6).normal(scale=3.0, size=(103, 10))
    scores = []
    for i in range(4):  # contiguous splits of sizes 25, 26, 26, 26 as in improved-gan
        part = special.softmax(logits[i * 103 // 4:(i + 1) * 103 // 4], axis=1)
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in part])))
    np.testing.assert_allclose(metrics.inception_score(logits, 4), (np.mean(scores), np.std(scores)),
                               rtol=1e-10)


def test_inception_score_rejects_too_many_splits():
    with pytest.raises(ValueError, match="num_splits"):
        metrics.inception_score(np.zeros((5, 3)), num_splits=6)


# --- Kernel Inception Distance -----------------------------------------------------------

def _polynomial_mmd2_closed_form(dim, shift):
    """Population MMD² between N(0, I) and N(shift·1, I) under k = (x·y/d + 1)³.

    With m = |μ|²: E k_xx = 1 + 3/d, E k_xy = 1 + 3(m + d)/d², and for x, y ~ N(μ, I),
    E(x·y) = m, E(x·y)² = m² + 2m + d, E(x·y)³ = m³ + 6m² + 3md + 6m.
    """
    m = dim * shift ** 2
    return 3 * m / dim + 3 * m ** 2 / dim ** 2 + (m ** 3 + 6 * m ** 2 + 3 * m * dim + 6 * m) / dim ** 3


def test_kid_of_point_masses_is_kernel_closed_form():
    """All rows equal a (resp. b): every estimate is k(a,a) + k(b,b) - 2k(a,b), std 0."""
    a, b = np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.0, -0.5])
    k = lambda x, y: (x @ y / 3 + 1) ** 3
    mean, std = metrics.kernel_inception_distance(np.tile(a, (20, 1)), np.tile(b, (30, 1)),
                                                  rng=np.random.default_rng(0), num_subsets=3,
                                                  subset_size=10)
    np.testing.assert_allclose(mean, k(a, a) + k(b, b) - 2 * k(a, b), rtol=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_kid_matches_explicit_unbiased_sum():
    """One subset: Σ_{i≠j} k(x_i,x_j)/(m(m-1)) + same for y - 2 Σ_{i,j} k(x_i,y_j)/m²."""
    rng = np.random.default_rng(7)
    features1, features2 = rng.normal(size=(40, 5)), rng.normal(1.0, 1.0, size=(30, 5))
    m = 12
    draw = np.random.default_rng(8)  # the same draws KID makes: features1 first, then features2
    x = features1[draw.choice(40, m, replace=False)]
    y = features2[draw.choice(30, m, replace=False)]
    k = lambda u, v: (u @ v / 5 + 1) ** 3
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    mean, _ = metrics.kernel_inception_distance(features1, features2, rng=np.random.default_rng(8),
                                                num_subsets=1, subset_size=m)
    np.testing.assert_allclose(mean, same / (m * (m - 1)) - 2 * cross / m ** 2, rtol=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_matches_closed_form_when_shifted():
    rng = np.random.default_rng(9)
    dim, shift = 8, 0.5
    base, same, shifted = (rng.normal(size=(1000, dim)), rng.normal(size=(1000, dim)),
                           rng.normal(shift, 1.0, size=(1000, dim)))
    closed_form = _polynomial_mmd2_closed_form(dim, shift)  # 1.117
    kid_same, _ = metrics.kernel_inception_distance(base, same, rng=rng, num_subsets=10, subset_size=500)
    kid_shifted, _ = metrics.kernel_inception_distance(base, shifted, rng=rng, num_subsets=10,
                                                       subset_size=500)
    assert abs(kid_same) < 0.02 * closed_form
    np.testing.assert_allclose(kid_shifted, closed_form, rtol=0.15)


def test_kid_rejects_subsets_larger_than_the_data():
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kernel_inception_distance(np.zeros((5, 2)), np.zeros((9, 2)),
                                          rng=np.random.default_rng(0), subset_size=6)


# --- Offline digits classifier (FDD) -----------------------------------------------------

NUM_TEST = 297  # sklearn's order: the last 297 digits (other writers) are the test split.


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    # The 8-bit grid the data pipeline uses: round(v * 255 / 16), then [0, 255] -> [-1, 1].
    images = (np.round(data.images * 255.0 / 16.0) / 127.5 - 1.0)[..., None].astype(np.float32)
    return (images[:-NUM_TEST], data.target[:-NUM_TEST]), (images[-NUM_TEST:], data.target[-NUM_TEST:])


@pytest.fixture(scope="module")
def trained(digits):
    (train_images, train_labels), _ = digits
    return classifier.train_feature_classifier(train_images, train_labels, rng=jax.random.key(0))


def test_classifier_generalises_to_held_out_writers(digits, trained):
    params, train_accuracy = trained
    _, (test_images, test_labels) = digits
    assert train_accuracy > 0.97
    assert classifier.classifier_accuracy(params, test_images, test_labels) > 0.90


def test_fdd_separates_real_digits_from_noise(digits, trained):
    params, _ = trained
    (train_images, _), (test_images, _) = digits
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, size=test_images.shape).astype(np.float32)
    real = classifier.digits_sample_quality(params, test_images, train_images,
                                            rng=np.random.default_rng(1), kid_subsets=10)
    fake = classifier.digits_sample_quality(params, noise, train_images,
                                            rng=np.random.default_rng(1), kid_subsets=10)
    assert real["fdd"] < 0.1 * fake["fdd"]
    assert real["kid_mean"] < 0.1 * fake["kid_mean"]
    # Real digits are confidently classified and nearly class-balanced within each split
    # of ~30 images, so their IS is close to its maximum of 10 (7.4 here; noise: 1.9).
    assert 6.0 < real["is_mean"] <= 10.0 and real["is_mean"] > 2.0 * fake["is_mean"]


def test_classifier_features_match_logits_layer_and_survive_save_load(digits, trained, tmp_path):
    params, _ = trained
    _, (test_images, _) = digits
    features, logits = classifier.classifier_features(params, test_images, batch_size=100)
    assert features.shape == (NUM_TEST, classifier.FEATURE_DIM) and logits.shape == (NUM_TEST, 10)
    dense = params["logits"]
    np.testing.assert_allclose(logits, features @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]),
                               rtol=1e-4, atol=1e-4)
    classifier.save_classifier(tmp_path / "clf.npz", params)
    np.testing.assert_array_equal(classifier.classifier_features(
        classifier.load_classifier(tmp_path / "clf.npz"), test_images)[0], features)
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="DigitsClassifier"):
        classifier.load_classifier(tmp_path / "other.npz")


def test_classifier_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
        classifier.train_feature_classifier(np.zeros((4, 8, 8)), np.zeros(4, int), rng=jax.random.key(0))
