"""Ridge regression with k-fold cross-validation over a grid of alphas, alpha chosen per target.

No intercept; the caller standardises X (`standardizer`). One decomposition serves every
alpha, fold and target chunk. With the thin SVD X = U S V^T (from the eigendecomposition of
the Gram matrix of X's smaller side, in float64) the full-data ridge fit is
Y_hat = U diag(d) U^T Y with d = s^2 / (s^2 + alpha), and the residuals of fold k held out of
the fit follow from it without refitting:

    Y_k - X_k B_{-k} = (I - H_kk)^{-1} (Y_k - Y_hat_k),   H_kk = U_k diag(d) U_k^T,

an m x m solve per fold and alpha (m = fold size). Alphas are scored as himalaya's RidgeCV
scores them (negative mean squared error per fold, averaged over folds; of equal scores the
largest alpha wins) and the final weights are V diag(s / (s^2 + alpha_t)) U^T y_t.

Targets are solved in chunks of `chunk` columns moved to the device one at a time, so Y and
the weights may be far larger than the device's memory.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass
class RidgeFit:
    weights: torch.Tensor  # [n_features, n_targets], on CPU, in the fit's dtype
    alphas: torch.Tensor  # [n_targets]: the alpha chosen for each target
    cv_scores: torch.Tensor  # [n_alphas, n_targets]: held-out negative MSE, mean over folds


def standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation (ddof 0, as scikit-learn's StandardScaler); a
    constant column gets scale 1 so that it standardises to zeros."""
    x64 = x.double()
    mean, std = x64.mean(0), x64.std(0, unbiased=False)
    return mean.float(), torch.where(std > 0, std, torch.ones_like(std)).float()


def group_folds(groups: torch.Tensor, n_folds: int) -> torch.Tensor:
    """Fold id of every row: the distinct groups (e.g. the image a trial showed), in order of
    first appearance, split into `n_folds` contiguous blocks, so that repeats of one image
    never sit on both sides of a split."""
    _, inverse = torch.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    if n_groups < n_folds:
        raise ValueError(f"{n_groups} groups cannot be split into {n_folds} folds")
    first = torch.full((n_groups,), len(groups)).scatter_reduce(0, inverse, torch.arange(len(groups)), "amin")
    order = torch.argsort(torch.argsort(first))  # rank of each group by first appearance
    return order[inverse] * n_folds // n_groups


def _decompose(x: torch.Tensor, rtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U [n, r], s [r], V [p, r]) of x, in float64, dropping directions whose squared
    singular value is below rtol x the largest."""
    n, p = x.shape
    x = x.double()
    gram = x.T @ x if p <= n else x @ x.T
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > rtol * evals.max().clamp_min(torch.finfo(torch.float64).tiny)
    s = evals[keep].sqrt()
    if p <= n:
        v = evecs[:, keep]
        return (x @ v) / s, s, v
    u = evecs[:, keep]
    return u, s, (x.T @ u) / s


def ridge_cv(x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float], folds: torch.Tensor, chunk: int = 4096,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, desc: str = "ridge") -> RidgeFit:
    """Fit y [n, T] from x [n, p] (already standardised); `folds` [n] gives each row's fold id.

    y stays where it is (CPU) and goes to `device` a chunk of targets at a time; U^T y is kept
    on CPU ([rank, T], in `dtype`) between the passes over alphas.
    """
    device = torch.device(device)
    n_folds = int(folds.max()) + 1
    alpha = torch.as_tensor(list(alphas), dtype=torch.float64)
    if len(alpha) == 0 or (alpha <= 0).any():
        raise ValueError(f"ridge alphas must be positive, got {list(alphas)}")
    u, s, v = (t.to(device) for t in _decompose(x.to(device)))
    rows = [torch.nonzero(folds == k).squeeze(1).to(device) for k in range(n_folds)]
    if any(len(r) in (0, len(folds)) for r in rows):
        raise ValueError(f"every fold id in 0..{n_folds - 1} needs rows on both sides of its split")
    s2 = s**2
    u_w = u.to(dtype)
    chunks = [slice(c, c + chunk) for c in range(0, y.shape[1], chunk)]
    uty = [(u_w.T @ y[:, c].to(device, dtype)).cpu() for c in chunks]  # [r, t] per chunk
    scores = torch.zeros(len(alpha), y.shape[1], dtype=torch.float64)
    eye = [torch.eye(len(r), dtype=torch.float64, device=device) for r in rows]
    for a in tqdm(range(len(alpha)), desc=desc, unit="alpha", mininterval=2, leave=False):
        d = s2 / (s2 + alpha[a])
        # Cholesky factors of I - H_kk, one per fold (positive definite for alpha > 0).
        factors = [torch.linalg.cholesky(i - (u[r] * d) @ u[r].T) for r, i in zip(rows, eye)]
        for c, uty_c in zip(chunks, uty):
            yc = y[:, c].to(device, dtype)
            resid = yc - u_w @ (d.to(dtype)[:, None] * uty_c.to(device))
            for r, factor in zip(rows, factors):
                held_out = torch.cholesky_solve(resid[r].double(), factor)
                scores[a, c] -= ((held_out**2).mean(0) / n_folds).cpu()
    # As himalaya: among (near-)equal scores the largest alpha wins.
    best = (scores + 1e-10 * alpha.log()[:, None]).argmax(0)
    chosen = alpha[best]
    weights = torch.empty(x.shape[1], y.shape[1], dtype=dtype)
    v_w = v.to(dtype)
    for c, uty_c in zip(chunks, uty):
        gain = (s[:, None] / (s2[:, None] + chosen[c].to(device)[None])).to(dtype)  # [r, t]
        weights[:, c] = (v_w @ (gain * uty_c.to(device))).cpu()
    return RidgeFit(weights, chosen, scores)
