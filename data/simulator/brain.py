"""A simulated visual cortex: per-subject voxel responses to scenes, with NSD-like noise.

Two ROIs per subject:
- early: retinotopic voxels, each a Gaussian receptive field over maps of local contrast,
  orientation energy (4 orientations) and colour-opponent energy, with a compressive
  nonlinearity (as in compressive spatial summation models of V1-V3);
- ventral: voxels selective to a few categories (area-weighted) and to a semantic
  embedding in which categories of one superordinate group lie close together.

Each voxel gets a signal amplitude drawn from a heavy-tailed distribution (most voxels
weak, a few strong) and a share of voxels carries no signal at all; every trial adds
independent Gaussian noise, so the 3 repeats of an image differ as NSD's do.

Subjects live in their own native space (own voxel count, layout and tuning) or, with
`common_space`, in one shared space where voxel i has similar tuning in every subject.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.simulator.scenes import CATEGORIES, GROUPS

GRID = 16  # resolution of the feature maps receptive fields integrate over
N_SEMANTIC = 16


def _blur(x: np.ndarray, k: int = 5) -> np.ndarray:
    """Box blur over the last two axes (cheap local mean)."""
    pad = k // 2
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(pad, pad), (pad, pad)], mode="edge")
    c = p.cumsum(-1).cumsum(-2)
    c = np.pad(c, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)])
    return (c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]) / (k * k)


def early_feature_maps(images: np.ndarray) -> np.ndarray:
    """Local contrast, 4 orientation energies and 4 rectified colour-opponent channels.

    images: uint8 [N, H, W, 3]. Returns float32 [N, 9, GRID, GRID].
    """
    n, h, w, _ = images.shape
    f = max(1, h // (4 * GRID))  # work at 4 samples per grid cell: enough for local energy
    x = images.reshape(n, h // f, f, w // f, f, 3).mean((2, 4), dtype=np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    contrast = np.abs(lum - _blur(lum, 3))
    gy, gx = np.gradient(lum, axis=(1, 2))
    orient = [(np.cos(t) * gx + np.sin(t) * gy) ** 2 for t in np.arange(4) * np.pi / 4]
    rg, by = r - g, b - (r + g) / 2
    colour = [np.maximum(rg, 0), np.maximum(-rg, 0), np.maximum(by, 0), np.maximum(-by, 0)]
    maps = np.stack([contrast, *orient, *colour], 1)  # [N, 9, h, w]
    c, h, w = maps.shape[1:]
    pooled = maps.reshape(n, c, GRID, h // GRID, GRID, w // GRID).mean((3, 5))
    return pooled.astype(np.float32)


def semantic_embeddings(seed: int) -> np.ndarray:
    """Category embeddings [n_categories, N_SEMANTIC]: group centroid plus category offset."""
    rng = np.random.default_rng(seed)
    centroids = {g: rng.normal(0, 1, N_SEMANTIC) for g in GROUPS}
    emb = np.stack([centroids[c[1]] + 0.6 * rng.normal(0, 1, N_SEMANTIC) for c in CATEGORIES])
    return emb.astype(np.float32)


@dataclass
class SubjectModel:
    """One subject's fixed random mapping from stimulus features to voxels."""

    n_early: int
    n_ventral: int
    rf: np.ndarray  # [n_early, GRID*GRID] Gaussian receptive-field weights
    channel_w: np.ndarray  # [n_early, 9] feature-channel tuning
    cat_w: np.ndarray  # [n_ventral, n_categories] category selectivity
    sem_w: np.ndarray  # [n_ventral, N_SEMANTIC] semantic tuning
    amplitude: np.ndarray  # [n_voxels] signal amplitude (0 for pure-noise voxels)
    voxel_order: np.ndarray  # permutation from [early | ventral] to the stored voxel order

    @property
    def n_voxels(self) -> int:
        return self.n_early + self.n_ventral

    @property
    def roi_indices(self) -> dict[str, np.ndarray]:
        """Stored-order voxel indices of each ROI."""
        inverse = np.argsort(self.voxel_order)  # stored position of each model voxel
        return {
            "early": np.sort(inverse[: self.n_early]),
            "ventral": np.sort(inverse[self.n_early :]),
        }


def make_subject(
    seed: int, n_voxels: int, early_fraction: float, noise_voxel_fraction: float, snr_scale: float
) -> SubjectModel:
    rng = np.random.default_rng(seed)
    n_early = int(round(n_voxels * early_fraction))
    n_ventral = n_voxels - n_early
    # Receptive fields: centres over the visual field, size growing with eccentricity.
    centres = rng.uniform(0, 1, (n_early, 2))
    ecc = np.hypot(centres[:, 0] - 0.5, centres[:, 1] - 0.5)
    sigma = 0.04 + 0.25 * ecc * rng.uniform(0.5, 1.5, n_early)
    grid = (np.arange(GRID) + 0.5) / GRID
    gx, gy = np.meshgrid(grid, grid)
    d2 = (gx.reshape(1, -1) - centres[:, :1]) ** 2 + (gy.reshape(1, -1) - centres[:, 1:]) ** 2
    rf = np.exp(-d2 / (2 * sigma[:, None] ** 2))
    rf /= rf.sum(1, keepdims=True)
    channel_w = rng.dirichlet(np.full(9, 0.3), n_early)
    n_cat = len(CATEGORIES)
    cat_w = np.zeros((n_ventral, n_cat))
    for i in range(n_ventral):  # each ventral voxel prefers 1 to 3 categories
        prefs = rng.choice(n_cat, size=rng.integers(1, 4), replace=False)
        cat_w[i, prefs] = rng.uniform(0.5, 1.0, len(prefs))
    sem_w = rng.normal(0, 1, (n_ventral, N_SEMANTIC)) / np.sqrt(N_SEMANTIC)
    # Heavy-tailed signal amplitude; a share of voxels carries none.
    amplitude = snr_scale * rng.gamma(shape=1.5, scale=1 / 1.5, size=n_voxels)
    amplitude[rng.uniform(size=n_voxels) < noise_voxel_fraction] = 0.0
    return SubjectModel(
        n_early=n_early,
        n_ventral=n_ventral,
        rf=rf.astype(np.float32),
        channel_w=channel_w.astype(np.float32),
        cat_w=cat_w.astype(np.float32),
        sem_w=sem_w.astype(np.float32),
        amplitude=amplitude.astype(np.float32),
        voxel_order=rng.permutation(n_voxels),
    )


def common_subject(template: SubjectModel, seed: int, individuality: float, noise_voxel_fraction: float,
                   snr_scale: float) -> SubjectModel:
    """A subject in a common space (as after registration to a template, e.g. MNI): the
    template's voxel layout and, for each voxel, the template's tuning blended with the
    subject's own in the share `individuality`; signal amplitudes are the subject's own."""
    own = make_subject(seed, template.n_voxels, template.n_early / template.n_voxels, noise_voxel_fraction, snr_scale)
    a = individuality

    def blend(t: np.ndarray, o: np.ndarray) -> np.ndarray:
        return ((1 - a) * t + a * o).astype(np.float32)

    return SubjectModel(n_early=template.n_early, n_ventral=template.n_ventral, rf=blend(template.rf, own.rf),
                        channel_w=blend(template.channel_w, own.channel_w), cat_w=blend(template.cat_w, own.cat_w),
                        sem_w=blend(template.sem_w, own.sem_w), amplitude=own.amplitude,
                        voxel_order=np.arange(template.n_voxels))


def raw_responses(subject: SubjectModel, feature_maps: np.ndarray, labels: np.ndarray, semantic: np.ndarray) -> np.ndarray:
    """Noise-free responses [N, n_voxels] in model order, before standardisation."""
    n = feature_maps.shape[0]
    flat = feature_maps.reshape(n, 9, GRID * GRID)
    # drive[n, v] = sum_c w[v, c] * <rf[v], F[n, c]>
    per_channel = flat @ subject.rf.T  # [N, 9, n_early]
    early = np.sqrt((per_channel * subject.channel_w.T[None]).sum(1) + 1e-6)
    area = np.sqrt(labels)  # compressive in object size
    sem = area @ semantic
    ventral = area @ subject.cat_w.T + sem @ subject.sem_w.T
    return np.concatenate([early, ventral], 1).astype(np.float32)


def standardise(raw: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """z-score each voxel's signal with statistics of a reference set of stimuli."""
    mu, sd = reference.mean(0), reference.std(0) + 1e-6
    return (raw - mu) / sd


def trial_betas(subject: SubjectModel, signal: np.ndarray, n_repeats: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy single-trial betas [N, n_repeats, n_voxels] in stored voxel order."""
    clean = signal * subject.amplitude[None]
    noise = rng.standard_normal((signal.shape[0], n_repeats, signal.shape[1]), dtype=np.float32)
    betas = clean[:, None] + noise
    return betas[..., subject.voxel_order]
