"""Frechet distance between Gaussians, the FID formula (Heusel et al. 2017, 1706.08500, eq. 6):

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

Only the trace of the matrix square root is needed. With A = S1^{1/2} S2^{1/2} (both PSD square roots),
A A^T = S1^{1/2} S2 S1^{1/2} has the eigenvalues of S1 S2, so tr((S1 S2)^{1/2}) is the sum of the singular
values of A (its nuclear norm). This route takes two symmetric eigendecompositions and one SVD, all backward
stable, and never forms the non-symmetric product S1 S2 whose matrix square root (scipy.linalg.sqrtm) magnifies
rounding in zero or tiny eigenvalues, as singular covariances (fewer samples than features) have.
method="sqrtm" is the pytorch-fid / ADM-evaluator recipe, kept for like-for-like checks.

What tests/test_evaluation.py checks: both methods give the closed form of covariances with shared eigenvectors
(32-d, to 1e-10 relative); on full-rank, non-commuting 64-d covariances the default agrees with scipy's sqrtm to
1e-10; on singular ones (16 samples of 64-d features) it matches the exact value to 1e-12, method="sqrtm" to 1e-5.
"""

import warnings

import numpy as np
import scipy.linalg


def _eigh_psd(sigma):
    """Eigenvalues (rounding-level negatives set to 0) and eigenvectors of a covariance."""
    w, v = np.linalg.eigh(sigma)
    return np.clip(w, 0, None), v


def trace_sqrt_product(sigma1, sigma2):
    """tr((S1 S2)^{1/2}) = nuclear norm of S1^{1/2} S2^{1/2}, for symmetric PSD S1, S2.

    With S_k = V_k W_k V_k^T, S1^{1/2} S2^{1/2} = V1 (W1^{1/2} V1^T V2 W2^{1/2}) V2^T and the outer
    orthogonal factors do not change singular values, so one product and one SVD suffice.
    """
    w1, v1 = _eigh_psd(sigma1)
    w2, v2 = _eigh_psd(sigma2)
    keep1, keep2 = w1 > 0, w2 > 0  # exact-zero directions add nothing; dropping them shrinks the SVD
    core = np.sqrt(w1[keep1])[:, None] * (v1[:, keep1].T @ v2[:, keep2]) * np.sqrt(w2[keep2])[None, :]
    return float(np.linalg.svd(core, compute_uv=False).sum())


def trace_sqrt_product_sqrtm(sigma1, sigma2, eps=1e-6):
    """tr((S1 S2)^{1/2}) the pytorch-fid / ADM way: scipy sqrtm of S1 S2; if that is not finite, retry with
    eps I added to both; drop an imaginary part that is rounding noise, refuse a real one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; finiteness is checked below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        residue = np.abs(np.diagonal(covmean).imag).max()
        if residue > 1e-3:  # ADM's and pytorch-fid's tolerance
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component {residue:.3g}: covariances are not PSD?")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, method="svd"):
    """d^2 between N(mu1, sigma1) and N(mu2, sigma2), computed in float64. method: "svd" (default) or "sqrtm"."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if method == "svd":
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = trace_sqrt_product_sqrtm(sigma1, sigma2)
    else:
        raise ValueError(f"unknown method {method!r}; use 'svd' or 'sqrtm'")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_stats(stats1, stats2, method="svd"):
    """FID between two {"mu", "sigma"} dicts (load_reference / FeatureStats.reference())."""
    return frechet_distance(stats1["mu"], stats1["sigma"], stats2["mu"], stats2["sigma"], method=method)
