"""Metric functions on tensors. Each docstring states the protocol it implements.

Every function checks its inputs (at least 2 samples, matching counts, finite values)
and raises `MetricInputError` with a one-line reason.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import (
    multilabel_auroc,
    multilabel_average_precision,
)
from torchmetrics.image.fid import FrechetInceptionDistance

from eval.resize import resize

ELEMENT_BUDGET = 1 << 24  # similarity entries held at once by the chunked searches (64 MiB of float32)


class MetricInputError(ValueError):
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


def _centred(x: torch.Tensor) -> torch.Tensor:
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
    a = _centred(real)
    if recon.dim() == real.dim() + 1:
        n, g = recon.shape[:2]
        return (a @ _centred(recon.reshape(n * g, *recon.shape[2:])).T).view(len(a), n, g).mean(2)
    return a @ _centred(recon).T


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


def correlation_distance(real: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over pairs of 1 - Pearson(real_i, recon_i), features flattened; lower is better.
    The EffNet-B and SwAV metrics (scipy's `distance.correlation` in MindEye's and
    Brain-Diffuser's code). With generations ([N, G, ...]) all pairs are averaged."""
    check_pair("correlation distance", real, recon)
    a = _centred(real)
    if recon.dim() == real.dim() + 1:
        n, g = recon.shape[:2]
        b = _centred(recon.reshape(n * g, -1)).view(n, g, -1)
    else:
        b = _centred(recon).unsqueeze(1)
    return (1 - (b * a[:, None]).sum(-1)).mean().item()


def _generations(recon: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] or [N, G, 3, H, W] -> [N * G, 3, H, W]."""
    return recon.flatten(0, 1) if recon.dim() == 5 else recon


def _repeat_real(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return real.repeat_interleave(recon.shape[1], 0) if recon.dim() == 5 else real


def _per_pair(fn, real: torch.Tensor, recon: torch.Tensor, chunk: int = 16) -> float:
    """Mean of fn(real chunk, recon chunk) -> per-pair values, over all (image, generation) pairs,
    in chunks so that 425 x 425 copies of large sets never sit in memory at once."""
    a, b = _repeat_real(real, recon), _generations(recon)
    return torch.cat([fn(a[s : s + chunk], b[s : s + chunk]).cpu() for s in range(0, len(a), chunk)]).mean().item()


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r of a[i] and b[i], each flattened, in float64."""
    a, b = (x.flatten(1).double() for x in (a, b))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def pixcorr(real: torch.Tensor, recon: torch.Tensor, size: int = 425, convention: str = "reference") -> float:
    """PixCorr (MindEye's `Reconstruction_Metrics`, as in Brain-Diffuser): images (float
    [N, 3, H, W] in [0, 1]) resized bilinearly to `size` (425), without antialiasing under the
    "reference" convention (see eval/resize.py); then the Pearson correlation over all pixels
    and channels of each (real, reconstruction) pair, in float64; the mean over pairs. With
    generations, over all (image, generation) pairs."""
    check_pair("PixCorr", real, recon)
    return _per_pair(lambda a, b: _pearson_rows(resize(a, size, convention=convention), resize(b, size, convention=convention)),
                     real, recon)


GRAY = (0.2125, 0.7154, 0.0721)  # luminance weights of the reference's rgb2gray
SSIM_WINDOWS = ("2d", "columns")


def _gaussian_valid(x: torch.Tensor, taps: torch.Tensor, columns_only: bool = False) -> torch.Tensor:
    """Separable filtering of [B, H, W] over the valid region only (no padding): a weighted sum
    of shifted slices, exact in float64 and without im2col buffers. `columns_only`: along H
    alone."""
    n = len(taps)
    x = sum(taps[k] * x[:, k : x.shape[1] - n + 1 + k] for k in range(n))
    if columns_only:
        return x
    return sum(taps[k] * x[:, :, k : x.shape[2] - n + 1 + k] for k in range(n))


def ssim(real: torch.Tensor, recon: torch.Tensor, size: int = 425, sigma: float = 1.5, convention: str = "reference",
         window: str = "2d") -> float:
    """SSIM (MindEye's `Reconstruction_Metrics`): images resized bilinearly to `size` (425; no
    antialiasing under the "reference" convention), converted to grayscale (skimage's
    rgb2gray: 0.2125 R + 0.7154 G + 0.0721 B), Gaussian window of sigma 1.5 truncated at 3.5
    sigma (11 taps), population (not sample) covariances, data range 1, K1 = 0.01,
    K2 = 0.03; the SSIM map is averaged over the pixels whose window lies inside the image
    (the border skimage crops), then over pairs. Float64 throughout.

    window "2d" (default) is skimage's `structural_similarity` on the 2-D grayscale images,
    which is what MindEye's call computed on scikit-image 0.20 and 0.22 (MindEye 1's and 2's
    pins): its `multichannel=True` argument is ignored there. "columns" is what the same call
    computed on scikit-image 0.17.2 (Brain-Diffuser's pin, behind its own table): the last
    axis taken as channels, i.e. a 1-D SSIM down each column of pixels, averaged over the
    columns.

    (torchmetrics' SSIM averages over reflect-padded borders too, so it is not used here.)
    """
    check_pair("SSIM", real, recon)
    if window not in SSIM_WINDOWS:
        raise MetricInputError(f"SSIM: unknown window {window!r}; known: {', '.join(SSIM_WINDOWS)}")
    radius = int(3.5 * sigma + 0.5)
    r = torch.arange(-radius, radius + 1, dtype=torch.float64, device=real.device)
    taps = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    taps = taps / taps.sum()
    w = torch.tensor(GRAY, dtype=torch.float64, device=real.device).view(1, 3, 1, 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    columns = window == "columns"

    def per_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, y = ((resize(im, size, convention=convention).double() * w).sum(1) for im in (a, b))
        mx, my = _gaussian_valid(x, taps, columns), _gaussian_valid(y, taps, columns)
        vx = _gaussian_valid(x * x, taps, columns) - mx * mx
        vy = _gaussian_valid(y * y, taps, columns) - my * my
        cxy = _gaussian_valid(x * y, taps, columns) - mx * my
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        return s.mean((1, 2))
    return _per_pair(per_pair, real, recon)


def n_way_top1(real_probs: torch.Tensor, gen_probs: torch.Tensor, n_way: int = 50, n_trials: int = 1000,
               seed: int = 0) -> dict[str, float]:
    """N-way top-1 accuracy, % (MinD-Vis' `get_n_way_top_k_acc` with the settings of its
    `gen_eval.py`: 50-way, 1000 trials; DC-MAE reports the same).

    A classifier's argmax on each real image (`real_probs`, softmax over C classes, [N, C]) is
    its true class. For each generation g of `gen_probs` ([N, C] or [N, G, C]), each image and
    each trial, n_way - 1 distinct other classes are drawn at random; the trial is correct
    if none of them scores above the true class (a tie counts as correct, as the reference's
    argmax takes the first of equal scores and puts the true class first). A generation's
    accuracy is its mean over trials and images. Returned: "mean" over the generations and
    "best", the best generation's (the reference's "top-1-class (max)").

    The draws are those of numpy's legacy generator, `np.random.seed(seed)` then one
    `np.random.choice(other classes, n_way - 1, replace=False)` per trial in the reference's
    order (generation, image, trial), so a reference run seeded alike gives the same numbers.
    """
    check_pair("n-way top-1", real_probs, gen_probs)
    n_classes = real_probs.shape[-1]
    if not 2 <= n_way <= n_classes:
        raise MetricInputError(f"n-way top-1: n_way={n_way} must lie between 2 and the {n_classes} classes")
    true = real_probs.argmax(-1).cpu().numpy()
    probs = (gen_probs if gen_probs.dim() == 3 else gen_probs.unsqueeze(1)).double().cpu().numpy()
    rng = np.random.RandomState(seed)
    classes = np.arange(n_classes)
    per_generation = []
    for g in range(probs.shape[1]):
        correct = []
        for i, t in enumerate(true):
            others = np.delete(classes, t)
            drawn = np.stack([rng.choice(others, n_way - 1, replace=False) for _ in range(n_trials)])
            correct.append((probs[i, g, drawn].max(1) <= probs[i, g, t]).mean())
        per_generation.append(float(np.mean(correct)) * 100)
    return {"mean": float(np.mean(per_generation)), "best": max(per_generation)}


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
    return _per_class_mean("mAP", multilabel_average_precision, scores, labels, need_negatives=False)


def multilabel_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ROC AUC (CLIP-MUSED's `test()`: sklearn's `roc_auc_score` per class) over the
    classes that have both positive and negative samples.

    Deliberately different: the reference catches the error sklearn raises for a class
    without both labels and keeps 1.0 for it, which inflates the mean; such a class's AUC is
    undefined, so it is left out here.
    """
    return _per_class_mean("ROC AUC", multilabel_auroc, scores, labels, need_negatives=True)


def hamming_loss(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> float:
    """Share of (sample, class) entries whose prediction (prob >= threshold, as CLIP-MUSED's
    `pred_prob.ge(0.5)`) disagrees with the label (sklearn's `hamming_loss`)."""
    target = _check_multilabel("Hamming loss", probs, labels)
    return ((probs >= threshold).long() != target).double().mean().item()


class _Precomputed(nn.Module):
    """The 'feature extractor' handed to torchmetrics' FID: features are already extracted."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ([N, D] each, e.g.
    InceptionV3 `avgpool` features), computed by torchmetrics' FrechetInceptionDistance
    with our extractor's features supplied directly, so no model runs twice. (MinD-Vis'
    FID is the same computation on torch-fidelity's 64-d InceptionV3 features of the images.)"""
    if len(real) < 2 or len(fake) < 2:
        raise MetricInputError(f"FID: needs at least 2 samples, got {len(real)} and {len(fake)}")
    for label, x in (("real", real), ("generated", fake)):
        if not torch.isfinite(x).all():
            raise MetricInputError(f"FID: the {label} features hold NaN or Inf values")
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[-1]))
    metric.update(real.flatten(1).double(), real=True)
    metric.update(fake.flatten(1).double(), real=False)
    return metric.compute().item()
