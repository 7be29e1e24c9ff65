"""Distances between two sets of detector features: Frechet distance (FID) and kernel distance (KID)."""

import numpy as np


def _as_features(feats, what):
    """Features as a float64 [N, D] array; raises ValueError naming `what` otherwise."""
    array = np.asarray(feats, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f'{what}: expected features of shape [N, D], got {list(array.shape)}')
    return array


def feature_mean_cov(
    feats,              # [N, D] features (any float dtype)
    chunk   = 4096,     # rows converted to float64 at a time, to bound memory
):
    """Mean [D] and biased covariance [D, D] (divided by N) of features [N, D], in float64."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 1 or feats.shape[1] < 1:
        raise ValueError(f'features: expected shape [N, D], got {list(feats.shape)}')
    n = feats.shape[0]
    mean = np.zeros(feats.shape[1], dtype=np.float64)
    for start in range(0, n, chunk):
        mean += feats[start:start + chunk].astype(np.float64).sum(axis=0)
    mean /= n
    # Same value as E[x x^T] - mu mu^T, but summed over centred rows: identical rows give exactly zero
    # instead of rounding noise, which sqrtm would otherwise amplify.
    cov = np.zeros([feats.shape[1]] * 2, dtype=np.float64)
    for start in range(0, n, chunk):
        centred = feats[start:start + chunk].astype(np.float64) - mean
        cov += centred.T @ centred
    return mean, cov / n


def frechet_distance_from_stats(
    mean_a,     # [D] mean of the first set
    cov_a,      # [D, D] covariance of the first set
    mean_b,     # [D] mean of the second set
    cov_b,      # [D, D] covariance of the second set
):
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), real part."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mean_a.shape * 2:
        raise ValueError(f'feature statistics do not match: means {list(mean_a.shape)} and {list(mean_b.shape)}, '
                         f'covariances {list(cov_a.shape)} and {list(cov_b.shape)}')
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product(cov_a, cov_b))


def trace_sqrt_product(
    cov_a,      # [D, D] symmetric positive semi-definite
    cov_b,      # [D, D] symmetric positive semi-definite
):
    """Tr sqrtm(S_a S_b), computed as sum(sqrt(eig(S_a^1/2 S_b S_a^1/2))).

    S_a S_b is similar to the symmetric PSD matrix S_a^1/2 S_b S_a^1/2, so both have the same real non-negative
    eigenvalues; the symmetric route stays finite for singular covariances (fewer items than dimensions), where
    scipy.linalg.sqrtm of the product can return NaN (seen with scipy 1.17).
    """
    eigval, eigvec = np.linalg.eigh(cov_a)
    root_a = (eigvec * np.sqrt(_drop_rounding_noise(eigval))) @ eigvec.T     # [D, D] S_a^1/2
    inner = root_a @ cov_b @ root_a
    inner = (inner + inner.T) / 2                                            # symmetric up to rounding
    return float(np.sqrt(_drop_rounding_noise(np.linalg.eigvalsh(inner))).sum())


def _drop_rounding_noise(eigval):
    """Eigenvalues of a PSD matrix with those below the rounding level (D * eps * max) set to 0.

    A zero eigenvalue comes out as +-1e-16 or so, and its square root (1e-8) would otherwise add up over the
    null space of a singular covariance.
    """
    cutoff = len(eigval) * np.finfo(np.float64).eps * max(float(np.abs(eigval).max(initial=0)), 1e-300)
    return np.where(eigval > cutoff, eigval, 0.0)


def frechet_distance(
    feats_a,    # [N, D] features of the first set
    feats_b,    # [M, D] features of the second set
):
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    a = _as_features(feats_a, 'feats_a')
    b = _as_features(feats_b, 'feats_b')
    if a.shape[1] != b.shape[1]:
        raise ValueError(f'feature dimensions differ: {a.shape[1]} and {b.shape[1]}')
    return frechet_distance_from_stats(*feature_mean_cov(a), *feature_mean_cov(b))


def kernel_inception_distance(
    feats_real,             # [N, D] features of real images
    feats_gen,              # [M, D] features of generated images
    num_subsets     = 100,  # number of random subset pairs averaged
    max_subset_size = 1000, # subset size cap; the size is min(N, M, max_subset_size)
    seed            = 0,    # seed of np.random.RandomState drawing the subsets
):
    """Unbiased MMD^2 with the cubic kernel (x.y/d + 1)^3, averaged over random subsets (the KID formula).

    Each subset draws the generated rows first, then the real rows, both without replacement.
    """
    real = _as_features(feats_real, 'feats_real')
    gen = _as_features(feats_gen, 'feats_gen')
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f'feature dimensions differ: {real.shape[1]} and {gen.shape[1]}')
    if num_subsets < 1:
        raise ValueError(f'num_subsets must be at least 1, got {num_subsets}')
    m = min(real.shape[0], gen.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f'KID needs at least 2 items per set, got {real.shape[0]} real and {gen.shape[0]} generated')
    dim = real.shape[1]
    rnd = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = gen[rnd.choice(gen.shape[0], m, replace=False)]
        y = real[rnd.choice(real.shape[0], m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        # Unbiased estimate: the within-set means leave out the diagonal (an item against itself).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        total += within - 2 * k_xy.mean()
    return float(total / num_subsets)
