"""Metric functions on tensors. Each docstring states the protocol it implements."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1).float(), dim=-1)


def _mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval of the mean."""
    n = len(values)
    sd = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * sd / math.sqrt(n)


def _top1_chunked(query: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For query i, whether keys[i] is the most similar key (ties count against). Bounded memory."""
    hits = []
    for start in range(0, len(query), chunk):
        sims = query[start : start + chunk] @ keys.T
        own = sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))]
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -math.inf
        hits.append(own > sims.max(1).values)
    return torch.cat(hits)


def retrieval(brain: torch.Tensor, image: torch.Tensor, n_way: int = 300, n_trials: int = 30, seed: int = 0) -> dict[str, float]:
    """Top-1 retrieval in both directions, as percentages.

    brain[i] and image[i] belong to the same test stimulus; both are flattened and
    L2-normalised. Forward ("image retrieval"): for each brain embedding, is its own
    image the most similar of the candidates? Backward ("brain retrieval"): for each
    image, is its own brain embedding the most similar? (MindEye's code names these the
    other way round.)

    Protocol: `n_trials` draws of `n_way` random test samples (seeded), top-1 within each
    draw, mean over draws with a 95% CI; plus the same over the full test set.
    """
    b, i = _flat_norm(brain), _flat_norm(image)
    n = len(b)
    n_way = min(n_way, n)
    g = torch.Generator().manual_seed(seed)
    fwd, bwd = [], []
    for _ in range(n_trials):
        idx = torch.randperm(n, generator=g)[:n_way]
        fwd.append(_top1_chunked(b[idx], i[idx]).float().mean())
        bwd.append(_top1_chunked(i[idx], b[idx]).float().mean())
    (f_mean, f_ci), (b_mean, b_ci) = _mean_ci(torch.stack(fwd) * 100), _mean_ci(torch.stack(bwd) * 100)
    return {
        "n_way": n_way, "n_trials": n_trials,
        "forward_top1": f_mean, "forward_top1_ci95": f_ci,
        "backward_top1": b_mean, "backward_top1_ci95": b_ci,
        "forward_top1_full": _top1_chunked(b, i).float().mean().item() * 100,
        "backward_top1_full": _top1_chunked(i, b).float().mean().item() * 100,
        "n_full": n,
    }
