"""train/ridge.py: cross-validated ridge against himalaya's RidgeCV and against explicit refits."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from train.ridge import group_folds, ridge_cv, standardizer

ALPHAS = np.logspace(-1, 5, 13)
N_FOLDS = 5


def simulate(n_images: int, n_features: int, n_targets: int = 50, repeats: int = 3, rank: int = 8,
             seed: int = 0, dtype: torch.dtype = torch.float64):
    """Single trials of `n_images` images, `repeats` adjacent rows each: voxels respond to a latent
    code of the image plus trial noise; targets (image features, equal across repeats) are a
    linear read-out of that code whose strength spans 1.5 decades, so the best alpha varies.
    Returns standardised x, y, and the image of every row."""
    g = torch.Generator().manual_seed(seed)
    image = torch.arange(n_images).repeat_interleave(repeats)
    code = torch.randn(n_images, rank, generator=g, dtype=torch.float64)
    x = code[image] @ torch.randn(rank, n_features, generator=g, dtype=torch.float64) * 0.3
    x = x + torch.randn(len(image), n_features, generator=g, dtype=torch.float64)
    strength = torch.logspace(-1.5, 0.5, n_targets, dtype=torch.float64)
    y = code @ torch.randn(rank, n_targets, generator=g, dtype=torch.float64) * strength
    y = (y + torch.randn(n_images, n_targets, generator=g, dtype=torch.float64))[image]
    mean, scale = standardizer(x)
    return ((x - mean) / scale).to(dtype), y.to(dtype), image


def splits(folds: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.flatnonzero(folds.numpy() != k), np.flatnonzero(folds.numpy() == k)) for k in range(N_FOLDS)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The problems here are tiny: one thread is as fast, and spares the run the OpenMP barrier
    stalls (seconds per fit instead of milliseconds) that two threads suffer when another
    process holds one of the machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def himalaya_ridge_cv():
    import himalaya.backend as himalaya_backend  # a dev dependency: its absence is a failure, not a skip
    from himalaya.ridge import RidgeCV

    previous = himalaya_backend.get_backend().name
    himalaya_backend.set_backend("torch")
    yield RidgeCV
    himalaya_backend.set_backend(previous)


@pytest.mark.parametrize("n_images,n_features", [(150, 200), (60, 400)], ids=["tall", "wide"])
def test_matches_himalaya(himalaya_ridge_cv, n_images, n_features):
    x, y, image = simulate(n_images, n_features)
    assert (x.shape[0] < x.shape[1]) == (n_features == 400)  # the wide case decomposes X X^T
    folds = group_folds(image, N_FOLDS)
    fit = ridge_cv(x, y, ALPHAS, folds, chunk=16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # himalaya's "n_samples < n_features" advice
        ref = himalaya_ridge_cv(alphas=ALPHAS, fit_intercept=False, cv=splits(folds)).fit(x, y)

    assert fit.weights.shape == (n_features, y.shape[1]) and fit.cv_scores.shape == (len(ALPHAS), y.shape[1])
    assert len(torch.unique(fit.alphas)) >= 4  # the data make the per-target choice matter
    assert torch.isclose(fit.alphas, ref.best_alphas_.double(), rtol=1e-6).all()
    pred, ref_pred = x @ fit.weights.double(), ref.predict(x).double()
    assert (pred - ref_pred).abs().max() < 1e-6 * ref_pred.abs().max()
    # himalaya adds 1e-10 * log(alpha) to the mean fold scores (a slope that breaks ties towards
    # larger alphas) and reports that sum as cv_scores_.
    best = fit.cv_scores.max(0).values
    torch.testing.assert_close(best + 1e-10 * fit.alphas.log(), ref.cv_scores_.double().flatten(), rtol=1e-12, atol=1e-12)


def test_held_out_scores_equal_explicit_refits():
    x, y, image = simulate(150, 200, n_targets=20)
    folds = group_folds(image, N_FOLDS)
    fit = ridge_cv(x, y, ALPHAS, folds, dtype=torch.float64)
    for a in (2, 7, 11):
        alpha = float(ALPHAS[a])
        score = torch.zeros(y.shape[1], dtype=torch.float64)
        for train, test in splits(folds):
            xt = x[train]
            b = torch.linalg.solve(xt.T @ xt + alpha * torch.eye(x.shape[1], dtype=torch.float64), xt.T @ y[train])
            score -= ((y[test] - x[test] @ b) ** 2).mean(0) / N_FOLDS
        torch.testing.assert_close(fit.cv_scores[a], score, rtol=1e-10, atol=1e-12)
    # and the final weights are the full-data ridge solution at each target's chosen alpha
    t = int(torch.argmax(fit.alphas))
    b = torch.linalg.solve(x.T @ x + fit.alphas[t] * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y[:, t])
    torch.testing.assert_close(fit.weights[:, t].double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_chunking_does_not_change_the_fit():
    x, y, image = simulate(60, 120, n_targets=45)
    folds = group_folds(image, N_FOLDS)
    small = ridge_cv(x, y, ALPHAS, folds, chunk=7, dtype=torch.float64)
    whole = ridge_cv(x, y, ALPHAS, folds, chunk=10_000, dtype=torch.float64)
    assert torch.equal(small.alphas, whole.alphas)
    torch.testing.assert_close(small.cv_scores, whole.cv_scores, rtol=1e-12, atol=1e-12)
    assert small.weights.dtype == torch.float64
    torch.testing.assert_close(small.weights, whole.weights, rtol=1e-12, atol=1e-14)


def test_float32_close_to_float64():
    x, y, image = simulate(150, 200)
    folds = group_folds(image, N_FOLDS)
    f64 = ridge_cv(x, y, ALPHAS, folds, dtype=torch.float64)
    f32 = ridge_cv(x.float(), y.float(), ALPHAS, folds, dtype=torch.float32)
    assert f32.weights.dtype == torch.float32
    torch.testing.assert_close(f32.cv_scores, f64.cv_scores, rtol=1e-4, atol=0)
    assert (f32.alphas == f64.alphas).float().mean() >= 0.95  # a near-tie may flip at most a few
    same = f32.alphas == f64.alphas
    pred32, pred64 = x @ f32.weights.double(), x @ f64.weights.double()
    assert ((pred32 - pred64)[:, same].abs().max() / pred64.abs().max()) < 1e-4


def test_group_folds():
    g = torch.Generator().manual_seed(1)
    ids = torch.randperm(1000, generator=g)[:23]  # arbitrary ids, not sorted
    groups = ids[torch.randperm(69, generator=g) % 23]  # 3 rows per group, interleaved
    folds = group_folds(groups, N_FOLDS)
    assert folds.shape == groups.shape
    per_group = {int(i): set(folds[groups == i].tolist()) for i in ids}
    assert all(len(f) == 1 for f in per_group.values())  # every group in exactly one fold
    counts = torch.bincount(torch.tensor([f.pop() for f in per_group.values()]), minlength=N_FOLDS)
    assert len(counts) == N_FOLDS and counts.sum() == 23 and counts.max() - counts.min() <= 1
    # blocks in order of first appearance: the fold of the groups as they first appear never decreases
    first_seen = list(dict.fromkeys(groups.tolist()))
    fold_of = [int(folds[groups == i][0]) for i in first_seen]
    assert fold_of == sorted(fold_of) and fold_of[0] == 0 and fold_of[-1] == N_FOLDS - 1
    # one group per fold is enough; fewer groups than folds is not
    assert group_folds(torch.tensor([7, 7, 3, 9, 1, 5]), 5).tolist() == [0, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        group_folds(torch.tensor([4, 4, 2, 2, 8, 8, 6]), 5)


@pytest.mark.parametrize("alphas", [[1.0, 0.0], [-1.0, 10.0], []])
def test_nonpositive_alpha_rejected(alphas):
    x, y, image = simulate(20, 10, n_targets=3)
    with pytest.raises(ValueError):
        ridge_cv(x, y, alphas, group_folds(image, N_FOLDS), dtype=torch.float64)


def test_ties_go_to_the_largest_alpha_as_in_himalaya(himalaya_ridge_cv):
    """Targets that carry nothing score alike at every alpha: himalaya picks the largest."""
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(40, 1, dtype=torch.float64)
    folds = group_folds(torch.arange(40), N_FOLDS)
    fit = ridge_cv(x, y, [1.0, 10.0, 100.0], folds, dtype=torch.float64)
    ref = himalaya_ridge_cv(alphas=np.array([1.0, 10.0, 100.0]), fit_intercept=False, cv=splits(folds)).fit(x, y)
    assert fit.alphas.tolist() == [100.0] and np.isclose(float(ref.best_alphas_[0]), 100.0)


def test_a_fold_without_rows_is_refused():
    x, y, _ = simulate(10, 6, n_targets=2, repeats=3)
    with pytest.raises(ValueError, match="fold id"):
        ridge_cv(x, y, [1.0, 10.0], torch.tensor([0, 2] * 15), dtype=torch.float64)
