"""Losses over the whole global batch (every rank computes the same value): MindEye's
contrastive losses (BiMixCo with voxel mixing, SoftCLIP, the low-level soft contrastive
loss), CLIP-MUSED's representational-similarity and orthogonality losses and DC-MAE's InfoNCE.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * logits.log_softmax(-1)).sum(-1).mean()


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1).float(), dim=-1)


def mix_voxels(voxels: torch.Tensor, rng: np.random.Generator, prob: float = 0.5, alpha: float = 0.15):
    """MixCo voxel mixing: x_i <- b_i x_i + (1 - b_i) x_perm(i) for a random half of the batch.

    Returns (mixed voxels, perm, betas), betas = 1 where a sample is not mixed.
    """
    return mix_within_subjects(voxels, torch.zeros(len(voxels), dtype=torch.long), rng, prob, alpha)


def mix_within_subjects(voxels: torch.Tensor, subjects: torch.Tensor, rng: np.random.Generator, prob: float = 0.5,
                        alpha: float = 0.15):
    """MixCo voxel mixing in which every sample mixes with one of its own subject's: perm
    indexes the whole batch, and perm(i) is a row of i's subject. (MindEye 2's multi-subject
    code draws each subject's permutation over 0..b-1 and concatenates them without offsets, so
    the soft labels of the later subjects' mixed samples point into the first subject's rows.)

    Returns (mixed voxels, perm, betas) as `mix_voxels`; with one subject the two agree draw for draw.
    """
    n = len(voxels)
    perm = torch.arange(n)
    for s in subjects.unique().tolist():
        rows = (subjects == s).nonzero().flatten()
        perm[rows] = rows[torch.from_numpy(rng.permutation(len(rows)))]
    betas = torch.from_numpy(rng.beta(alpha, alpha, n)).to(voxels.dtype)
    betas[torch.from_numpy(rng.random(n) >= prob)] = 1.0
    b = betas.to(voxels.device)[:, None]
    return b * voxels + (1 - b) * voxels[perm.to(voxels.device)], perm, betas


def bimixco(pred: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, betas: torch.Tensor, tau: float = 0.006) -> torch.Tensor:
    """Bidirectional MixCo loss with soft targets P = diag(b); P[i, perm(i)] += 1 - b_i.

    Equal to MindEye's `mixco_nce` except where the permutation leaves a sample in place
    (perm(i) = i): MindEye overwrites P[i, i] with 1 - b_i, dropping the sample's own share
    b_i, so that row no longer sums to 1; here P[i, i] = b_i + (1 - b_i) = 1, which is what
    the mixed sample is (a mix of the stimulus with itself)."""
    logits = _flat_norm(pred) @ _flat_norm(target).T / tau
    n = len(logits)
    probs = torch.diag(betas.float()).to(logits.device)
    probs[torch.arange(n), perm.to(logits.device)] += 1 - betas.float().to(logits.device)
    return 0.5 * (soft_cross_entropy(logits, probs) + soft_cross_entropy(logits.T, probs.T))


def soft_clip(pred: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """SoftCLIP: the brain-to-image similarities learn the image-to-image similarity distribution.

    Both directions (the rows of S = pred target^T / tau, and the rows of S^T) take the same
    soft targets, the row softmax of the symmetric teacher logits target target^T / tau, as
    MindEye's `soft_clip_loss` does."""
    p, t = _flat_norm(pred), _flat_norm(target)
    teacher = (t @ t.T / tau).softmax(-1)
    student = p @ t.T / tau
    return 0.5 * (soft_cross_entropy(student, teacher) + soft_cross_entropy(student.T, teacher))


def cosine_anneal(start: float, end: float, n: int) -> list[float]:
    """n values from `start` to `end` along half a cosine."""
    if n <= 1:
        return [start] * max(n, 0)
    return [end + (start - end) / 2 * (1 + math.cos(math.pi * i / (n - 1))) for i in range(n)]


def soft_contrastive(student: torch.Tensor, teacher: torch.Tensor, teacher_aug: torch.Tensor, tau: float) -> torch.Tensor:
    """MindEye's low-level soft contrastive loss on per-position features [..., C] (all
    leading dims flattened): the student's similarities to the teacher's features of an
    augmented view learn the teacher's own clean-to-augmented similarity distribution."""
    s, t, a = (F.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1) for x in (student, teacher, teacher_aug))
    forward = soft_cross_entropy(s @ a.T / tau, (t @ a.T / tau).softmax(-1))
    backward = soft_cross_entropy(a @ s.T / tau, (a @ t.T / tau).softmax(-1))
    return 0.5 * (forward + backward)


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Representational similarity matrix [B, B]: cosine similarity between samples' features."""
    x = _flat_norm(x)
    return x @ x.T


def rsa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||RSM(pred) - RSM(target)||_F^2 / B^2."""
    return (similarity_matrix(pred) - similarity_matrix(target)).square().mean()


def orthogonality_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a b^T||_F^2 / B^2 for [B, D] features: pushes the two representations apart."""
    return (a.float() @ b.float().T).square().mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE on cosine similarity / tau: rows i of `a` and `b` are a positive pair,
    every other row of the batch a negative (DC-MAE's self- and cross-contrast)."""
    logits = _flat_norm(a) @ _flat_norm(b).T / tau
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
