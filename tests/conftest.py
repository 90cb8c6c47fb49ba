"""Shared fixtures. Tests run in JAX's default float32 mode; every float64 reference is NumPy."""

import numpy as np
import pytest


def _reference_fields(betas) -> dict[str, np.ndarray]:
    """Every derived array of a β chain in float64, from Ho et al. 2020 eqs. 4, 6, 7 (improved-diffusion's names)."""
    b = np.asarray(betas, np.float64)
    a = 1.0 - b
    ac = np.cumprod(a)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
    clipped = posterior_variance[1] if len(b) > 1 else b[0]
    return dict(
        betas=b,
        alphas=a,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=1.0 / np.sqrt(ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        log_betas=np.log(b),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.append(clipped, posterior_variance[1:])),
        posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(a) / (1.0 - ac),
    )


@pytest.fixture(scope="session")
def reference_fields():
    """betas (float64 [K]) -> dict of every Schedule field computed in float64 NumPy."""
    return _reference_fields
