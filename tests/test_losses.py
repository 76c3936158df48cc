import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.losses import (
    bimixco,
    cosine_anneal,
    mix_voxels,
    orthogonality_loss,
    rsa_loss,
    similarity_matrix,
    soft_clip,
    soft_contrastive,
)


def test_bimixco_without_mixing_is_symmetric_clip_loss():
    torch.manual_seed(0)
    pred, target = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
    loss = bimixco(pred, target, torch.arange(8), torch.ones(8), tau=0.1)
    logits = F.normalize(pred.flatten(1), dim=-1) @ F.normalize(target.flatten(1), dim=-1).T / 0.1
    labels = torch.arange(8)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(loss, expected)


def test_bimixco_soft_targets_follow_the_mixing():
    torch.manual_seed(0)
    pred, target = torch.randn(6, 10), torch.randn(6, 10)
    perm, betas = torch.tensor([1, 0, 3, 2, 5, 4]), torch.tensor([0.7, 1.0, 0.4, 1.0, 1.0, 1.0])
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / 0.05
    forward = backward = 0.0
    for i in range(6):  # sample i is b_i of its own stimulus and 1 - b_i of stimulus perm(i)
        forward -= betas[i] * logits[i].log_softmax(-1)[i] + (1 - betas[i]) * logits[i].log_softmax(-1)[perm[i]]
    for j in range(6):  # column j of the soft targets, as the reference defines it
        col = logits[:, j].log_softmax(-1)
        backward -= betas[j] * col[j] + sum((1 - betas[i]) * col[i] for i in range(6) if perm[i] == j)
    expected = 0.5 * (forward + backward) / 6
    torch.testing.assert_close(bimixco(pred, target, perm, betas, tau=0.05), expected)


def test_mix_voxels_mixes_about_half_and_keeps_the_rest():
    x = torch.arange(2000, dtype=torch.float32)[:, None].repeat(1, 3)
    mixed, perm, betas = mix_voxels(x, np.random.default_rng(0), prob=0.5, alpha=0.15)
    unmixed = betas == 1
    assert 0.4 < unmixed.float().mean() < 0.6
    torch.testing.assert_close(mixed[unmixed], x[unmixed])
    expected = betas[:, None] * x + (1 - betas[:, None]) * x[perm]
    torch.testing.assert_close(mixed, expected)
    again = mix_voxels(x, np.random.default_rng(0))
    assert torch.equal(again[0], mixed)


def test_soft_clip_is_stationary_when_predictions_equal_targets():
    torch.manual_seed(0)
    target = torch.randn(8, 16)
    pred = target.clone().requires_grad_(True)
    soft_clip(pred, target, tau=0.05).backward()
    assert pred.grad.abs().max() < 1e-5
    other = torch.randn(8, 16, requires_grad=True)
    soft_clip(other, target, tau=0.05).backward()
    assert other.grad.abs().max() > 1e-3


def test_cosine_anneal_endpoints_and_monotone():
    temps = cosine_anneal(0.004, 0.0075, 11)
    assert temps[0] == 0.004 and abs(temps[-1] - 0.0075) < 1e-12
    assert all(a < b for a, b in zip(temps, temps[1:]))


def test_soft_contrastive_prefers_a_student_that_matches_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(4, 9, 16)
    aug = teacher + 0.3 * torch.randn_like(teacher)
    matched = soft_contrastive(teacher, teacher, aug, 0.075)
    shuffled = soft_contrastive(teacher[:, torch.randperm(9)], teacher, aug, 0.075)
    assert matched < shuffled
    assert torch.isclose(soft_contrastive(2 * teacher, teacher, aug, 0.075), matched)  # cosine: scale-free


def test_rsa_loss_compares_similarity_structure_not_features():
    torch.manual_seed(0)
    x = torch.randn(6, 10)
    rotation = torch.linalg.qr(torch.randn(10, 10))[0]
    assert rsa_loss(x, 3.0 * x @ rotation).item() == pytest.approx(0.0, abs=1e-10)  # same RSM
    y = torch.randn(6, 4)  # features of another size are fine: only the 6 x 6 RSMs meet
    a, b = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    expected = ((a @ a.T - b @ b.T) ** 2).sum() / 36
    torch.testing.assert_close(rsa_loss(x, y), expected)
    torch.testing.assert_close(similarity_matrix(x).diagonal(), torch.ones(6))


def test_orthogonality_loss_is_the_mean_squared_cross_product():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert orthogonality_loss(a, torch.tensor([[0.0, 3.0], [1.0, 0.0]])).item() == pytest.approx((0 + 1 + 36 + 0) / 4)
    assert orthogonality_loss(a, torch.tensor([[0.0, 0.0], [0.0, 0.0]])).item() == 0.0
