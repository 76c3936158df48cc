"""Scores of decoded predictions against their targets, as the reference code computes them:
n-way retrieval, two-way identification, Pearson r and multi-label mAP / ROC AUC / Hamming loss.

They sit in the lowest layer because both training-time validation (train/) and the eval
report (eval/) use them, and those two packages do not import each other; the image metrics
built on them are in eval/metrics.py. Every function checks its inputs (at least 2 samples,
matching counts, finite values) and raises `MetricInputError` with a one-line reason.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from models.errors import InputError

ELEMENT_BUDGET = 1 << 24  # similarity entries held at once by the chunked searches (64 MiB of float32)


class MetricInputError(InputError):
    """Inputs a metric cannot score; the message says why."""


def check_pair(name: str, a: torch.Tensor, b: torch.Tensor, same_shape: bool = False) -> None:
    """At least 2 samples, as many in `a` as in `b`, all values finite."""
    if len(a) < 2 or len(b) < 2:
        raise MetricInputError(f"{name}: needs at least 2 samples, got {len(a)} and {len(b)}")
    if len(a) != len(b):
        raise MetricInputError(f"{name}: sample counts differ ({len(a)} vs {len(b)})")
    if same_shape and a.shape != b.shape:
        raise MetricInputError(f"{name}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    for label, x in (("first", a), ("second", b)):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise MetricInputError(f"{name}: the {label} input holds NaN or Inf values")


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1).float(), dim=-1)


def centred_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows flattened, mean-subtracted and L2-normalised (in float64, stored as float32):
    their dot products are Pearson r."""
    x = x.flatten(1).double()
    x = x - x.mean(1, keepdim=True)
    return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)).float()  # scale-free: tiny features stay exact


def _mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval of the mean."""
    n = len(values)
    sd = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * sd / math.sqrt(n)


def _chunk(n_keys: int) -> int:
    return max(1, ELEMENT_BUDGET // max(1, n_keys))


def own_rank(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """For each query i, how many other keys are at least as similar as keys[i] (0 = retrieved
    first; ties count against). Dot-product similarity, computed in chunks of queries so
    that memory stays bounded for any N."""
    ranks = []
    for start in range(0, len(query), _chunk(len(keys))):
        sims = query[start : start + _chunk(len(keys))] @ keys.T
        rows = torch.arange(len(sims), device=sims.device)
        own = sims[rows, start + rows].clone()
        sims[rows, start + rows] = -math.inf
        ranks.append((sims >= own[:, None]).sum(1))
    return torch.cat(ranks)


def top_k_indices(query: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k most similar keys for each query (cosine similarity), chunked."""
    q, kk = _flat_norm(query), _flat_norm(keys)
    k = min(k, len(kk))
    return torch.cat([(q[s : s + _chunk(len(kk))] @ kk.T).topk(k, dim=1).indices for s in range(0, len(q), _chunk(len(kk)))])


def retrieval(brain: torch.Tensor, image: torch.Tensor, n_way: int = 300, n_trials: int = 30, seed: int = 0,
              ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval in both directions, as percentages.

    brain[i] and image[i] belong to the same test stimulus; both are flattened and
    L2-normalised. Forward ("image retrieval"): for each brain embedding, is its own
    image among the k most similar candidates? Backward ("brain retrieval"): for each
    image, is its own brain embedding among the k most similar? (MindEye's code names
    these the other way round.) Ties count as misses.

    Protocol: `n_trials` draws of `n_way` random test samples (seeded), top-k within each
    draw, mean over draws with a 95% CI (normal approximation over draws); plus the same
    over the full test set (`*_full`), computed in bounded-memory chunks.
    """
    check_pair("retrieval", brain, image)
    b, i = _flat_norm(brain), _flat_norm(image)
    n = len(b)
    n_way = min(n_way, n)
    g = torch.Generator().manual_seed(seed)
    draws = {"forward": [], "backward": []}
    for _ in range(n_trials):
        idx = torch.randperm(n, generator=g)[:n_way]
        draws["forward"].append(own_rank(b[idx], i[idx]))
        draws["backward"].append(own_rank(i[idx], b[idx]))
    full = {"forward": own_rank(b, i), "backward": own_rank(i, b)}
    out: dict[str, float] = {"n_way": n_way, "n_trials": n_trials, "n_full": n}
    for direction in ("forward", "backward"):
        ranks = torch.stack(draws[direction])
        for k in ks:
            mean, ci = _mean_ci((ranks < k).double().mean(1) * 100)
            out[f"{direction}_top{k}"], out[f"{direction}_top{k}_ci95"] = mean, ci
            out[f"{direction}_top{k}_full"] = (full[direction] < k).double().mean().item() * 100
    return out


def pearson_matrix(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """r[i, j] = Pearson correlation of flattened real[i] and recon[j].

    `recon` may carry a generations axis ([N, G, ...]); r is then averaged over the G
    generations of each reconstruction.
    """
    a = centred_rows(real)
    if recon.dim() == real.dim() + 1:
        n, g = recon.shape[:2]
        return (a @ centred_rows(recon.reshape(n * g, *recon.shape[2:])).T).view(len(a), n, g).mean(2)
    return a @ centred_rows(recon).T


def pearson_along(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson r of a and b along `dim` (e.g. 0: per feature, across samples; 1: per sample)."""
    ac, bc = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (ac * bc).sum(dim) / (ac.norm(dim=dim) * bc.norm(dim=dim)).clamp_min(1e-12)


def two_way_identification(real: torch.Tensor, recon: torch.Tensor) -> float:
    """Two-way identification, %. Features are flattened; r[i, j] = Pearson(real_i, recon_j).
    Chance is 50%.

    recon [N, ...] (one reconstruction per image): the MindEye / Brain-Diffuser protocol
    (`two_way_identification` in MindEye's `Reconstruction_Metrics`, `pairwise_corr_all` in
    Brain-Diffuser): for each reconstruction j, the share of the other N - 1 real images i
    with r[i, j] < r[j, j]; the mean over j.

    recon [N, G, ...] (G generations per image): Takagi & Nishimoto's protocol
    (`codes/utils/identification.py`): r averaged over the G generations of each image, then
    for each real image i the share of the other N - 1 images j with r[i, j] < r[i, i] (the
    other orientation: a row of r, not a column); the mean over i.
    """
    check_pair("two-way identification", real, recon)
    r = pearson_matrix(real, recon)
    n = len(r)
    own = r.diagonal()
    if recon.dim() == real.dim() + 1:
        wins = (r < own[:, None]).sum(1)
    else:
        wins = (r < own[None, :]).sum(0)  # the diagonal never counts: r[j, j] < r[j, j] is false
    return (wins.double() / (n - 1)).mean().item() * 100


def _check_multilabel(name: str, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    check_pair(name, scores, labels, same_shape=True)
    if labels.dim() != 2 or labels.shape[1] < 2:
        raise MetricInputError(f"{name}: expected [N, C] scores and labels with C >= 2, got {tuple(labels.shape)}")
    if not ((labels == 0) | (labels == 1)).all():
        raise MetricInputError(f"{name}: labels must be 0 or 1")
    return labels.long()


def _per_class_mean(name: str, per_class, scores: torch.Tensor, labels: torch.Tensor, need_negatives: bool) -> float:
    """Mean of a torchmetrics per-class score over the classes with a positive sample (and,
    if `need_negatives`, a negative one too); the other classes are left out."""
    target = _check_multilabel(name, scores, labels)
    kept = target.sum(0) > 0
    if need_negatives:
        kept &= target.sum(0) < len(target)
    if not kept.any():
        raise MetricInputError(f"{name}: no class has {'both positive and negative' if need_negatives else 'a positive'} samples")
    with warnings.catch_warnings():  # torchmetrics warns about the classes left out
        warnings.simplefilter("ignore", UserWarning)
        values = per_class(scores.float(), target, num_labels=target.shape[1], average="none")
    return values[kept].mean().item()


def multilabel_map(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean average precision (CLIP-MUSED's `test()`: sklearn's `average_precision_score`
    per class) over the classes with at least one positive sample. scores: [N, C] (any
    monotone score), labels: [N, C] in {0, 1}.

    Deliberately different: sklearn (1.1 and later) gives a class without positives an AP of
    0, which the reference's mean then counts; its AP is undefined, so it is left out here.
    """
    from torchmetrics.functional.classification import multilabel_average_precision  # 2 s to import: on use

    return _per_class_mean("mAP", multilabel_average_precision, scores, labels, need_negatives=False)


def multilabel_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ROC AUC (CLIP-MUSED's `test()`: sklearn's `roc_auc_score` per class) over the
    classes that have both positive and negative samples.

    Deliberately different: the reference catches the error sklearn raises for a class
    without both labels and keeps 1.0 for it, which inflates the mean; such a class's AUC is
    undefined, so it is left out here.
    """
    from torchmetrics.functional.classification import multilabel_auroc  # 2 s to import: on use

    return _per_class_mean("ROC AUC", multilabel_auroc, scores, labels, need_negatives=True)


def hamming_loss(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> float:
    """Share of (sample, class) entries whose prediction (prob >= threshold, as CLIP-MUSED's
    `pred_prob.ge(0.5)`) disagrees with the label (sklearn's `hamming_loss`)."""
    target = _check_multilabel("Hamming loss", probs, labels)
    return ((probs >= threshold).long() != target).double().mean().item()
