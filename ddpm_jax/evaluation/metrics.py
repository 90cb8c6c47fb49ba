"""Sample-quality metrics on extracted features, in float64 NumPy/SciPy.

Model-agnostic: the features and logits come from the FID Inception network
(`inception.py`) or from the offline digits classifier (`classifier.py`).
  FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule".
  IS:  Salimans et al. 2016, "Improved Techniques for Training GANs", sec. 4.
  KID: Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 3 and app. D.
Each follows the reference implementation the published numbers come from
(TTUR / pytorch-fid for FID, improved-gan for IS, the KID code that
torch-fidelity ports), so that values are comparable given the same features.
"""

import warnings

import numpy as np
from scipy import linalg, special


def _as_matrix(name, x):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D]; got shape {x.shape}.")
    return x


def feature_statistics(features):
    """Mean and covariance of features [N, D] -> (mu [D], sigma [D, D]).

    The Gaussian fitted to the features in the FID (Heusel et al. 2017, sec. 3);
    sigma is the unbiased sample covariance (N - 1), as np.cov in pytorch-fid.
    """
    features = _as_matrix("features", features)
    if features.shape[0] < 2:
        raise ValueError(
            f"features needs at least 2 rows to estimate a covariance; got {features.shape[0]}."
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

    Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)
    (Heusel et al. 2017, eq. 6). As in TTUR / pytorch-fid: when the product is
    singular (fewer samples than dimensions) sqrtm is retried with eps·I added
    to both covariances; a small imaginary part from round-off is dropped, a
    large one (diagonal |imag| > 1e-3) raises, as it means the inputs are not
    covariance matrices.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    dim = mu1.shape[0]
    for name, x, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)),
                           ("sigma2", sigma2, (dim, dim))):
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1; got {x.shape}.")

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the covariance diagonals.")
        offset = eps * np.eye(dim)
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(
                "frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; sigma1 and sigma2 must be covariance matrices."
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, num_splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) over num_splits splits -> (mean, std).

    Salimans et al. 2016, sec. 4; p(y|x) = softmax(logits) [N, K], p(y) is the
    mean of p(y|x) within each split, and mean/std are over the per-split
    scores (np.std, ddof=0), split by contiguous slices as the original code.
    Probabilities are accepted as log-probabilities: pass np.log(probs);
    zero probabilities (-inf) contribute 0·log 0 = 0.
    """
    logits = _as_matrix("logits", logits)
    num_samples = logits.shape[0]
    if not 1 <= num_splits <= num_samples:
        raise ValueError(f"num_splits must be in [1, N={num_samples}]; got {num_splits}.")
    probs = special.softmax(logits, axis=1)
    scores = []
    for i in range(num_splits):
        part = probs[i * num_samples // num_splits:(i + 1) * num_samples // num_splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = special.rel_entr(part, marginal).sum(axis=1)  # rel_entr(0, q) = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_kernel(x, y):
    """k(x, y) = (x·y / d + 1)³, the KID kernel (Bińkowski et al. 2018, sec. 3)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(features1, features2):
    """Unbiased MMD² between two equal-size samples [m, D] under polynomial_kernel.

    Bińkowski et al. 2018, eq. 2 ("unbiased" estimator of their code): the
    within-sample sums leave out the diagonal (m(m-1) pairs), the cross term
    keeps all m² pairs.
    """
    m = features1.shape[0]
    k_xx = polynomial_kernel(features1, features1)
    k_yy = polynomial_kernel(features2, features2)
    k_xy = polynomial_kernel(features1, features2)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return within - 2.0 * k_xy.sum() / (m * m)


def kernel_inception_distance(features1, features2, *, rng, num_subsets=100, subset_size=1000):
    """KID: mean and std of mmd2_unbiased over random subsets -> (mean, std).

    Bińkowski et al. 2018, app. D: num_subsets times, draw subset_size rows
    without replacement from each feature set [N1, D] and [N2, D] and average
    the unbiased MMD². rng is a np.random.Generator; std is np.std (ddof=0).
    """
    features1 = _as_matrix("features1", features1)
    features2 = _as_matrix("features2", features2)
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(
            f"features1 and features2 must have the same D; got {features1.shape[1]} and {features2.shape[1]}."
        )
    largest = min(features1.shape[0], features2.shape[0])
    if not 2 <= subset_size <= largest:
        raise ValueError(
            f"subset_size must be in [2, min(N1, N2)={largest}]; got {subset_size}."
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1; got {num_subsets}.")
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        subset1 = features1[rng.choice(features1.shape[0], subset_size, replace=False)]
        subset2 = features2[rng.choice(features2.shape[0], subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(subset1, subset2)
    return float(mmds.mean()), float(mmds.std())
