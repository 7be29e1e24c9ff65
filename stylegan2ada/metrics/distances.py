"""Distances between two sets of detector features: Frechet distance (FID), kernel distance (KID), and the k-nearest-
neighbour measures (precision / recall, density / coverage, nearest-neighbour distances for data copying)."""

import numpy as np
import scipy.stats
import torch


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


#----------------------------------------------------------------------------
# k-nearest-neighbour measures on feature sets: precision and recall (Kynkaanniemi et al. 2019), density and coverage
# (Naeem et al. 2020), nearest-neighbour distances and the data-copying test (Meehan et al. 2020).
#
# All of them compare squared Euclidean distances in float64, one block of `chunk` rows against a whole set at a time:
# memory is chunk x N values (200 MB for chunk 512 and N = 50 000), never N x N. A block comes from the fast form
# |a|^2 + |b|^2 - 2 a.b (a matrix product), whose rounding depends on the block's shape; every entry that close to a
# decision (a radius, a k-th or a nearest distance) is recomputed as sum((a - b)^2), which gives d(a, b) and d(b, a)
# the same bits wherever they are computed. Ties (a set against itself: each radius is a distance to another point of
# the set) are then decided the same way for every pair, and as a brute force over the full matrix decides them.

KNN_CHUNK = 512         # rows of one distance block
EXACT_PAIRS = 1 << 16   # pairs recomputed exactly at a time


def _knn_inputs(
    feats_real,     # [N, D] features of real images
    feats_gen,      # [M, D] features of generated images
    k,              # neighbours of the k-NN balls; each set needs more than k items
    device,         # torch device of the distance blocks
):
    """Both sets as float64 tensors on `device`, centred on the real mean; ValueError naming the problem."""
    real = _as_features(feats_real, 'feats_real')
    gen = _as_features(feats_gen, 'feats_gen')
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f'feature dimensions differ: {real.shape[1]} and {gen.shape[1]}')
    if k < 1 or min(len(real), len(gen)) <= k:
        raise ValueError(f'k = {k} nearest neighbours need at least {k + 1} items per set, got {len(real)} real and '
                         f'{len(gen)} generated')
    # Distances do not change under a shift; centring keeps |a|^2 + |b|^2 - 2 a.b from cancelling large norms.
    centre = real.mean(axis=0)
    as_tensor = lambda x: torch.from_numpy(x - centre).to(device=device, dtype=torch.float64)
    return as_tensor(real), as_tensor(gen)


def _square_norms(x):
    return (x * x).sum(dim=1)                                                   # [N]


class _Blocks:
    """Squared distances from blocks of rows of `a` to all rows of `b`: fast, then exact near a decision."""

    def __init__(self, a, b, chunk):
        self.a, self.b, self.chunk = a, b, chunk
        self.a_sq, self.b_sq = _square_norms(a), _square_norms(b)               # [N_a], [N_b]
        # Bound of the fast form's rounding error, relative to |a|^2 + |b|^2 (a dot product over D terms, two sums).
        self.rel_tol = 4 * (a.shape[1] + 2) * np.finfo(np.float64).eps

    def __iter__(self):
        """(start, stop, fast block [c, N_b], a bound [c, 1] of its rounding error in each row)."""
        b_max = self.b_sq.max()
        for start in range(0, len(self.a), self.chunk):
            stop = min(start + self.chunk, len(self.a))
            block = (self.a_sq[start:stop, None] + self.b_sq[None, :] - 2 * (self.a[start:stop] @ self.b.T)).clamp_(min=0)
            # One bound per row (its largest norm sum): valid for comparing any two entries of the row.
            yield start, stop, block, (self.a_sq[start:stop, None] + b_max) * self.rel_tol

    def refine(self, block, start, mask):
        """Recompute the entries of `block` (rows start.., all columns) where mask is set as sum((a - b)^2), in place."""
        rows, cols = mask.nonzero(as_tuple=True)
        for s in range(0, len(rows), EXACT_PAIRS):
            r, c = rows[s:s + EXACT_PAIRS], cols[s:s + EXACT_PAIRS]
            block[r, c] = ((self.a[r + start] - self.b[c]) ** 2).sum(dim=1)
        return block


def _knn_sq_radii(
    x,          # [N, D] float64
    k,          # which neighbour
    chunk,      # rows per block
):
    """Squared distance [N] from each row to its k-th nearest neighbour in x, the row itself excluded (by index)."""
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    blocks = _Blocks(x, x, chunk)
    for start, stop, block, tol in blocks:
        rows = torch.arange(stop - start, device=x.device)
        block[rows, rows + start] = float('inf')                                # a point is not its own neighbour; a duplicate is
        kth = block.kthvalue(k, dim=1).values
        blocks.refine(block, start, (block - kth[:, None]).abs() <= 2 * tol)
        out[start:stop] = block.kthvalue(k, dim=1).values
    return out


def _ball_hits(
    points,     # [M, D] float64 points to test
    centres,    # [N, D] float64 ball centres
    sq_radii,   # [N] squared ball radii
    chunk,      # rows of `points` per block
):
    """Ball membership [M, N] as counts per point (int64 [M]); the boundary counts as inside."""
    out = torch.empty(len(points), dtype=torch.int64, device=points.device)
    blocks = _Blocks(points, centres, chunk)
    for start, stop, block, tol in blocks:
        blocks.refine(block, start, (block - sq_radii[None, :]).abs() <= 2 * tol)
        out[start:stop] = (block <= sq_radii[None, :]).sum(dim=1)
    return out


def precision_recall(
    feats_real,             # [N, D] features of real images
    feats_gen,              # [M, D] features of generated images
    k       = 3,            # k-th neighbour sets the radius of each point's ball (3 in the paper and NVIDIA's pr50k3)
    chunk   = KNN_CHUNK,    # rows per distance block
    device  = 'cpu',        # torch device of the float64 distance blocks
):
    """Improved precision and recall (Kynkaanniemi et al. 2019): (precision, recall) as floats.

    Each point's ball has the radius of its k-th nearest neighbour within its own set (itself excluded). Precision is
    the share of generated points inside at least one real ball; recall the share of real points inside at least one
    generated ball. A point exactly on a ball's boundary (distance == radius) counts as inside.
    """
    real, gen = _knn_inputs(feats_real, feats_gen, k, device)
    precision = (_ball_hits(gen, real, _knn_sq_radii(real, k, chunk), chunk) > 0).double().mean()
    recall = (_ball_hits(real, gen, _knn_sq_radii(gen, k, chunk), chunk) > 0).double().mean()
    return float(precision), float(recall)


def density_coverage(
    feats_real,             # [N, D] features of real images
    feats_gen,              # [M, D] features of generated images
    k       = 5,            # k-th real neighbour sets the radius of each real point's ball (5 in the paper)
    chunk   = KNN_CHUNK,    # rows per distance block
    device  = 'cpu',        # torch device of the float64 distance blocks
):
    """Density and coverage (Naeem et al. 2020): (density, coverage) as floats.

    Only real points have balls (radius: distance to the k-th nearest other real point). Density is the number of
    (generated point, real ball containing it) pairs divided by k M, about 1 for generated points distributed as the
    reals; coverage is the share of real balls containing at least one generated point. A point exactly on a ball's
    boundary counts as inside.
    """
    real, gen = _knn_inputs(feats_real, feats_gen, k, device)
    sq_radii = _knn_sq_radii(real, k, chunk)
    density = _ball_hits(gen, real, sq_radii, chunk).double().sum() / (k * len(gen))
    # Coverage asks the transposed question: does a real point's ball hold any generated point?
    covered = torch.empty(len(real), dtype=torch.bool, device=real.device)
    blocks = _Blocks(real, gen, chunk)
    for start, stop, block, tol in blocks:
        radii = sq_radii[start:stop, None]
        blocks.refine(block, start, (block - radii).abs() <= 2 * tol)
        covered[start:stop] = (block <= radii).any(dim=1)
    return float(density), float(covered.double().mean())


def nearest_neighbour_distances(
    feats_query,            # [M, D] features whose nearest neighbours are wanted
    feats_ref,              # [N, D] features searched
    exclude_self    = False,# True: query and ref are the same set, and row i may not take itself (leave-one-out)
    chunk           = KNN_CHUNK, # rows per distance block
    device          = 'cpu',# torch device of the float64 distance blocks
):
    """Euclidean distance [M] (float64 numpy) from each query row to its nearest ref row (0 for an identical row)."""
    query = _as_features(feats_query, 'feats_query')
    ref = _as_features(feats_ref, 'feats_ref')
    if query.shape[1] != ref.shape[1]:
        raise ValueError(f'feature dimensions differ: {query.shape[1]} and {ref.shape[1]}')
    if exclude_self and (query.shape != ref.shape or len(ref) < 2):
        raise ValueError(f'leave-one-out needs one set of at least 2 items, got {len(query)} and {len(ref)}')
    centre = ref.mean(axis=0)
    as_tensor = lambda x: torch.from_numpy(x - centre).to(device=device, dtype=torch.float64)
    out = torch.empty(len(query), dtype=torch.float64, device=device)
    blocks = _Blocks(as_tensor(query), as_tensor(ref), chunk)
    for start, stop, block, tol in blocks:
        if exclude_self:
            rows = torch.arange(stop - start, device=block.device)
            block[rows, rows + start] = float('inf')
        nearest = block.min(dim=1).values
        # Exact values for the candidates: a copy's distance is then exactly 0, not the fast form's rounding noise.
        blocks.refine(block, start, block <= nearest[:, None] + 2 * tol)
        out[start:stop] = block.min(dim=1).values
    return out.sqrt().cpu().numpy()


def mann_whitney_z(
    x,      # [M] sample whose values are expected to be no smaller (generated-to-training distances)
    y,      # [N] reference sample (held-out-to-training distances)
):
    """z-score of the Mann-Whitney U of x against y: (U - MN/2) / sqrt(MN(M+N+1)/12), U = #(x_i > y_j) + #(x_i == y_j)/2.

    About N(0, 1) when x and y come from one distribution; strongly negative when x is mostly smaller. No tie
    correction of the variance, as in Meehan et al. 2020's Z_U.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(x) < 1 or len(y) < 1:
        raise ValueError(f'the Mann-Whitney test needs two non-empty samples, got {len(x)} and {len(y)}')
    m, n = len(x), len(y)
    ranks = scipy.stats.rankdata(np.concatenate([x, y]))       # average ranks: a tie counts a half
    u = ranks[:m].sum() - m * (m + 1) / 2
    return float((u - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12))


def memorisation(
    feats_train,            # [N, D] features of the training images
    feats_gen,              # [M, D] features of generated images
    feats_ref       = None, # [R, D] features of held-out real images; None = leave-one-out over the training images
    quantile        = 0.05, # the copy threshold is this quantile of the reference distances
    chunk           = KNN_CHUNK, # rows per distance block
    device          = 'cpu',# torch device of the float64 distance blocks
):
    """Data copying: dict(share, ct, threshold, baseline_share, gen_distances [M], ref_distances [R or N]).

    Each generated image's distance to its nearest training image is set against the reference distances: held-out
    real images to their nearest training image, or (without held-out images) each training image to its nearest
    other one. share: the fraction of generated images at or below the `quantile`-th quantile of the reference
    distances (numpy's linear interpolation); baseline_share is that fraction for the reference itself (about
    `quantile`). ct: mann_whitney_z(generated, reference), Meehan et al. 2020's C_T with one cell (Z_U);
    about N(0, 1) without copying, strongly negative when generated images sit closer to the training images.
    """
    if not 0 < quantile < 1:
        raise ValueError(f'quantile must be in (0, 1), got {quantile}')
    gen_d = nearest_neighbour_distances(feats_gen, feats_train, chunk=chunk, device=device)
    if feats_ref is None:
        ref_d = nearest_neighbour_distances(feats_train, feats_train, exclude_self=True, chunk=chunk, device=device)
    else:
        ref_d = nearest_neighbour_distances(feats_ref, feats_train, chunk=chunk, device=device)
    threshold = float(np.quantile(ref_d, quantile))
    return dict(share=float((gen_d <= threshold).mean()), ct=mann_whitney_z(gen_d, ref_d), threshold=threshold,
                baseline_share=float((ref_d <= threshold).mean()), gen_distances=gen_d, ref_distances=ref_d)
