"""Metric functions on tensors. Each docstring states the protocol it implements.

Every function checks its inputs (at least 2 samples, matching counts, finite values)
and raises `MetricInputError` with a one-line reason.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import (
    multilabel_auroc,
    multilabel_average_precision,
    multilabel_hamming_distance,
)
from torchmetrics.image.fid import FrechetInceptionDistance

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
    """Two-way identification, % (MindEye / Brain-Diffuser protocol).

    Features of N real and N reconstructed images are flattened; r[i, j] =
    Pearson(real_i, recon_j). For each reconstruction j, the share of the other N - 1
    real images i with r[i, j] < r[j, j]; the mean over j. Chance is 50%.

    Given recon as [N, G, ...] (G generations per image), r is first averaged over the
    generations: Takagi & Nishimoto's variant.
    """
    check_pair("two-way identification", real, recon)
    r = pearson_matrix(real, recon)
    n = len(r)
    own = r.diagonal()
    wins = (r < own[None, :]).sum(0)  # the diagonal never counts: r[j, j] < r[j, j] is false
    return (wins.double() / (n - 1)).mean().item() * 100


def correlation_distance(real: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over pairs of 1 - Pearson(real_i, recon_i), features flattened; lower is better.
    The EffNet-B and SwAV metrics. With generations ([N, G, ...]) all pairs are averaged."""
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


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _per_pair(fn, real: torch.Tensor, recon: torch.Tensor, chunk: int = 16) -> float:
    """Mean of fn(real chunk, recon chunk) -> per-pair values, over all (image, generation) pairs,
    in chunks so that 425 x 425 copies of large sets never sit in memory at once."""
    a, b = _repeat_real(real, recon), _generations(recon)
    return torch.cat([fn(a[s : s + chunk], b[s : s + chunk]).cpu() for s in range(0, len(a), chunk)]).mean().item()


def pixcorr(real: torch.Tensor, recon: torch.Tensor, size: int = 425) -> float:
    """PixCorr: images (float [N, 3, H, W] in [0, 1]) resized bilinearly to `size` (425 in
    the reference), then Pearson correlation over all pixels and channels of each
    (real, reconstruction) pair; the mean over pairs. With generations, over all pairs."""
    check_pair("PixCorr", real, recon)
    return _per_pair(lambda a, b: (_centred(_resize(a, size)) * _centred(_resize(b, size))).sum(1), real, recon)


GRAY = (0.2125, 0.7154, 0.0721)  # luminance weights of the reference's rgb2gray


def _gaussian_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable filtering of [B, H, W] over the valid region only (no padding): a weighted sum
    of shifted slices, exact in float64 and without im2col buffers."""
    n = len(taps)
    x = sum(taps[k] * x[:, k : x.shape[1] - n + 1 + k] for k in range(n))
    return sum(taps[k] * x[:, :, k : x.shape[2] - n + 1 + k] for k in range(n))


def ssim(real: torch.Tensor, recon: torch.Tensor, size: int = 425, sigma: float = 1.5) -> float:
    """SSIM: images resized bilinearly to `size` (425), converted to grayscale
    (0.2125 R + 0.7154 G + 0.0721 B), Gaussian window of sigma 1.5 truncated at 3.5 sigma
    (11 x 11), population (not sample) covariances, data range 1, K1 = 0.01, K2 = 0.03;
    the SSIM map is averaged over the pixels whose window lies inside the image (the
    border the reference crops), then over pairs. Float64 throughout.

    (torchmetrics' SSIM averages over reflect-padded borders too, so it is not used here.)
    """
    check_pair("SSIM", real, recon)
    radius = int(3.5 * sigma + 0.5)
    r = torch.arange(-radius, radius + 1, dtype=torch.float64, device=real.device)
    taps = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    taps = taps / taps.sum()
    w = torch.tensor(GRAY, dtype=torch.float64, device=real.device).view(1, 3, 1, 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def per_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, y = ((_resize(im, size).double() * w).sum(1) for im in (a, b))
        mx, my = _gaussian_valid(x, taps), _gaussian_valid(y, taps)
        vx = _gaussian_valid(x * x, taps) - mx * mx
        vy = _gaussian_valid(y * y, taps) - my * my
        cxy = _gaussian_valid(x * y, taps) - mx * my
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        return s.mean((1, 2))
    return _per_pair(per_pair, real, recon)


def n_way_top1(real_probs: torch.Tensor, gen_probs: torch.Tensor, n_way: int = 50, n_trials: int = 40,
               seed: int = 0) -> float:
    """N-way top-1 accuracy, % (the MinD-Vis / DC-MAE protocol).

    A classifier's argmax on each real image is its true class. For each generated image
    (`gen_probs`, softmax over C classes, [N, C] or [N, G, C]) and each trial, the true
    class and n_way - 1 other classes drawn at random compete; the trial is correct if
    the true class scores highest. Mean over trials, generations and images.
    """
    check_pair("n-way top-1", real_probs, gen_probs)
    if n_way > real_probs.shape[-1]:
        raise MetricInputError(f"n-way top-1: n_way={n_way} exceeds the {real_probs.shape[-1]} classes")
    true = real_probs.argmax(-1)
    probs = gen_probs if gen_probs.dim() == 3 else gen_probs.unsqueeze(1)
    true = true[:, None].expand(probs.shape[:2]).reshape(-1)
    probs = probs.reshape(-1, probs.shape[-1])
    rows = torch.arange(len(probs))
    g = torch.Generator().manual_seed(seed)
    correct = []
    for _ in range(n_trials):
        noise = torch.rand(probs.shape, generator=g)
        noise[rows, true] = 2.0  # never drawn as a competitor
        others = noise.argsort(1)[:, : n_way - 1]
        correct.append(probs[rows, true] > probs.gather(1, others).max(1).values)
    return torch.stack(correct).double().mean().item() * 100


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
    """Mean average precision over the classes with at least one positive sample.
    scores: [N, C] (any monotone score), labels: [N, C] in {0, 1}."""
    return _per_class_mean("mAP", multilabel_average_precision, scores, labels, need_negatives=False)


def multilabel_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ROC AUC over the classes that have both positive and negative samples; other
    classes are left out (the CLIP-MUSED code counted them as 1.0)."""
    return _per_class_mean("ROC AUC", multilabel_auroc, scores, labels, need_negatives=True)


def hamming_loss(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> float:
    """Share of (sample, class) entries whose prediction (prob > threshold) disagrees with the label."""
    target = _check_multilabel("Hamming loss", probs, labels)
    return multilabel_hamming_distance(probs.float(), target, num_labels=target.shape[1], threshold=threshold,
                                       average="micro").item()


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
    with our extractor's features supplied directly, so no model runs twice."""
    if len(real) < 2 or len(fake) < 2:
        raise MetricInputError(f"FID: needs at least 2 samples, got {len(real)} and {len(fake)}")
    for label, x in (("real", real), ("generated", fake)):
        if not torch.isfinite(x).all():
            raise MetricInputError(f"FID: the {label} features hold NaN or Inf values")
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[-1]))
    metric.update(real.flatten(1).double(), real=True)
    metric.update(fake.flatten(1).double(), real=False)
    return metric.compute().item()
