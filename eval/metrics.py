"""Image metrics on tensors (PixCorr, SSIM, correlation distance, n-way top-1, FID). Each
docstring states the protocol it implements.

The scores shared with training-time validation (retrieval, two-way identification,
Pearson r, multi-label) are in models/scores.py. Every function checks its inputs (at least
2 samples, matching counts, finite values) and raises `MetricInputError` with a one-line reason.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from eval.resize import resize
from models.scores import MetricInputError, centred_rows, check_pair


def correlation_distance(real: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over pairs of 1 - Pearson(real_i, recon_i), features flattened; lower is better.
    The EffNet-B and SwAV metrics (scipy's `distance.correlation` in MindEye's and
    Brain-Diffuser's code). With generations ([N, G, ...]) all pairs are averaged."""
    check_pair("correlation distance", real, recon)
    a = centred_rows(real)
    if recon.dim() == real.dim() + 1:
        n, g = recon.shape[:2]
        b = centred_rows(recon.reshape(n * g, -1)).view(n, g, -1)
    else:
        b = centred_rows(recon).unsqueeze(1)
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
    from torchmetrics.image.fid import FrechetInceptionDistance  # 2 s to import: on use

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[-1]))
    metric.update(real.flatten(1).double(), real=True)
    metric.update(fake.flatten(1).double(), real=False)
    return metric.compute().item()
