"""Every metric against hand-computed cases and a direct formula-by-formula computation."""
import math

import numpy as np
import pytest
import torch

from eval import metrics
from eval.metrics import MetricInputError


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_two_way_self_is_100_shuffled_is_about_50():
    torch.manual_seed(0)
    f = torch.randn(200, 64)
    assert metrics.two_way_identification(f, f) == 100.0
    shuffled = [metrics.two_way_identification(f, f[torch.randperm(200)]) for _ in range(5)]
    assert abs(np.mean(shuffled) - 50) < 2


def test_two_way_matches_direct_formula():
    rng = np.random.default_rng(1)
    real, recon = rng.normal(size=(12, 3, 5)), rng.normal(size=(12, 3, 5))
    recon[:6] += real[:6]  # half of them informative
    n = len(real)
    r = np.array([[_pearson(real[i], recon[j]) for j in range(n)] for i in range(n)])
    direct = np.mean([sum(r[i, j] < r[j, j] for i in range(n) if i != j) / (n - 1) for j in range(n)]) * 100
    got = metrics.two_way_identification(torch.tensor(real), torch.tensor(recon))
    assert got == pytest.approx(direct, abs=1e-9)


def test_two_way_takagi_averages_r_over_generations():
    rng = np.random.default_rng(2)
    real, recon = rng.normal(size=(10, 8)), rng.normal(size=(10, 5, 8))
    n = len(real)
    r = np.array([[np.mean([_pearson(real[i], recon[j, g]) for g in range(5)]) for j in range(n)] for i in range(n)])
    direct = np.mean([sum(r[i, j] < r[j, j] for i in range(n) if i != j) / (n - 1) for j in range(n)]) * 100
    assert metrics.two_way_identification(torch.tensor(real), torch.tensor(recon)) == pytest.approx(direct)
    # Differs from scoring the first generation alone in general.
    assert metrics.pearson_matrix(torch.tensor(real), torch.tensor(recon)).shape == (n, n)


def test_two_way_hand_case():
    real = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # recon 0 = real 0 (r=1 wins both), recon 1 = real 0 too (its own r=-1 loses both), recon 2 = real 2 (wins both).
    recon = torch.stack([real[0], real[0], real[2]])
    assert metrics.two_way_identification(real, recon) == pytest.approx(100 * 2 / 3)


def test_correlation_distance_direct_and_hand():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 4, 3)), rng.normal(size=(6, 4, 3))
    direct = np.mean([1 - _pearson(a[i], b[i]) for i in range(6)])
    assert metrics.correlation_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(direct, abs=1e-6)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    assert metrics.correlation_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.correlation_distance(x, -x) == pytest.approx(2.0, abs=1e-6)


def test_pixcorr_direct_and_resize():
    rng = np.random.default_rng(4)
    a, b = rng.random((5, 3, 16, 16)), rng.random((5, 3, 16, 16))
    direct = np.mean([_pearson(a[i], b[i]) for i in range(5)])
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    assert metrics.pixcorr(ta, tb, size=16) == pytest.approx(direct, abs=1e-5)  # same size: no resampling
    assert metrics.pixcorr(ta, ta) == pytest.approx(1.0, abs=1e-6)
    assert metrics.pixcorr(ta, 1 - ta) == pytest.approx(-1.0, abs=1e-6)
    # With generations every (image, generation) pair counts.
    gens = torch.stack([tb, ta], 1)
    assert metrics.pixcorr(ta, gens, size=16) == pytest.approx((direct + 1) / 2, abs=1e-5)


def _ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two grayscale images, window by window over the valid region."""
    r = np.arange(-5, 6)
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * px * px).sum() - mx ** 2, (w * py * py).sum() - my ** 2
            cxy = (w * px * py).sum() - mx * my
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_windowed_formula():
    rng = np.random.default_rng(5)
    a = rng.random((2, 3, 24, 24))
    b = np.clip(a + 0.2 * rng.normal(size=a.shape), 0, 1)
    gray = lambda im: 0.2125 * im[0] + 0.7154 * im[1] + 0.0721 * im[2]  # noqa: E731
    direct = np.mean([_ssim_direct(gray(a[i]), gray(b[i])) for i in range(2)])
    got = metrics.ssim(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), size=24)
    assert got == pytest.approx(direct, abs=1e-5)
    assert metrics.ssim(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0, abs=1e-9)


def test_n_way_top1_hand_cases():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    assert metrics.n_way_top1(probs, probs, n_way=4) == 100.0
    wrong = probs.flip(1)  # the true class is never the highest
    assert metrics.n_way_top1(probs, wrong, n_way=4) == 0.0
    # 2-way: gen image 0 ranks its true class 2nd of 4, so it wins against 2 of the 3 others.
    gen = torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.0, 0.0, 1.0, 0.0]])
    got = metrics.n_way_top1(probs, gen, n_way=2, n_trials=3000)
    assert got == pytest.approx((2 / 3 + 1) / 2 * 100, abs=1.5)
    with pytest.raises(MetricInputError, match="exceeds"):
        metrics.n_way_top1(probs, gen, n_way=5)


def test_multilabel_hand_cases():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.8, 0.7, 0.6], [0.3, 0.6, 0.6], [0.1, 0.1, 0.6]])
    labels = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]]).float()
    # Class 0: ranking .9(+) .8(-) .3(+) .1(-): AP = (1/1 + 2/3) / 2; AUC = 3 of 4 pos-neg pairs.
    # Classes 1 and 2 have no negative: AP is 1 for both, AUC leaves them out.
    assert metrics.multilabel_map(scores, labels) == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3, abs=1e-6)
    assert metrics.multilabel_auc(scores, labels) == pytest.approx(0.75, abs=1e-6)
    # Hamming at 0.5: predictions [1,0,1],[1,1,1],[0,1,1],[0,0,1] vs labels -> 4 disagreements of 12;
    # a score of exactly 0.5 predicts 0.
    assert metrics.hamming_loss(scores, labels) == pytest.approx(4 / 12)
    assert metrics.hamming_loss(torch.full((2, 2), 0.5), torch.ones(2, 2)) == 1.0
    no_positive = labels.clone()
    no_positive[:, 2] = 0
    # A class without positives is left out of mAP (here AP of class 2 would be undefined).
    assert metrics.multilabel_map(scores, no_positive) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2, abs=1e-6)


def test_multilabel_auc_matches_pairwise_formula():
    rng = np.random.default_rng(6)
    scores, labels = rng.random((40, 6)), (rng.random((40, 6)) > 0.6).astype(float)
    labels[:, 5] = 1  # one class without negatives: excluded
    aucs = []
    for c in range(5):
        pos, neg = scores[labels[:, c] == 1, c], scores[labels[:, c] == 0, c]
        aucs.append(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))
    assert metrics.multilabel_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(np.mean(aucs), abs=1e-6)


def test_fid_matches_closed_form():
    torch.manual_seed(7)
    a, b = torch.randn(400, 1) * 2 + 1, torch.randn(300, 1) * 0.5 - 1
    va, vb = a.var().item(), b.var().item()  # unbiased, as torchmetrics
    direct = (a.mean() - b.mean()).item() ** 2 + va + vb - 2 * math.sqrt(va * vb)
    assert metrics.fid(a, b) == pytest.approx(direct, rel=1e-4)
    x = torch.randn(100, 8)
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-3)


def test_retrieval_top5_and_chunking(monkeypatch):
    torch.manual_seed(8)
    brain, image = torch.randn(120, 16), torch.randn(120, 16)
    brain[:60] += 2 * image[:60]
    full = metrics.retrieval(brain, image, n_way=120, n_trials=1)
    sims = torch.nn.functional.normalize(brain) @ torch.nn.functional.normalize(image).T
    own = sims.diagonal()
    rank = (sims >= own[:, None]).sum(1) - 1
    assert full["forward_top5_full"] == pytest.approx((rank < 5).double().mean().item() * 100)
    assert full["forward_top1_full"] <= full["forward_top5_full"]
    monkeypatch.setattr(metrics, "ELEMENT_BUDGET", 7 * 120)  # 7 queries per chunk
    assert metrics.retrieval(brain, image, n_way=120, n_trials=1) == full
    top = metrics.top_k_indices(brain, image, 5)
    assert torch.equal(top, sims.topk(5, dim=1).indices)


@pytest.mark.parametrize("fn", [metrics.two_way_identification, metrics.correlation_distance, metrics.retrieval,
                                metrics.pixcorr, metrics.ssim, metrics.fid])
def test_bad_inputs_are_clear_errors(fn):
    images = torch.rand(4, 3, 16, 16)
    with pytest.raises(MetricInputError, match="at least 2 samples"):
        fn(images[:1], images[:1])
    with pytest.raises(MetricInputError, match="NaN"):
        bad = images.clone()
        bad[1, 0, 0, 0] = math.nan
        fn(images, bad)
    if fn is not metrics.fid:
        with pytest.raises(MetricInputError, match="counts differ"):
            fn(images, images[:3])
