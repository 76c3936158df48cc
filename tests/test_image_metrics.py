"""Every metric against hand-computed cases and a direct formula-by-formula computation."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval import metrics
from models import scores as model_scores
from models.scores import MetricInputError
from eval.resize import resize, resize_like_pil


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_two_way_self_is_100_shuffled_is_about_50():
    torch.manual_seed(0)
    f = torch.randn(200, 64)
    assert model_scores.two_way_identification(f, f) == 100.0
    shuffled = [model_scores.two_way_identification(f, f[torch.randperm(200)]) for _ in range(5)]
    assert abs(np.mean(shuffled) - 50) < 2


def test_two_way_matches_direct_formula():
    rng = np.random.default_rng(1)
    real, recon = rng.normal(size=(12, 3, 5)), rng.normal(size=(12, 3, 5))
    recon[:6] += real[:6]  # half of them informative
    n = len(real)
    r = np.array([[_pearson(real[i], recon[j]) for j in range(n)] for i in range(n)])
    direct = np.mean([sum(r[i, j] < r[j, j] for i in range(n) if i != j) / (n - 1) for j in range(n)]) * 100
    got = model_scores.two_way_identification(torch.tensor(real), torch.tensor(recon))
    assert got == pytest.approx(direct, abs=1e-9)


def test_two_way_takagi_averages_r_over_generations_row_wise():
    rng = np.random.default_rng(2)
    real, recon = rng.normal(size=(10, 8)), rng.normal(size=(10, 5, 8))
    recon[:5] += 0.5 * real[:5, None]
    n = len(real)
    r = np.array([[np.mean([_pearson(real[i], recon[j, g]) for g in range(5)]) for j in range(n)] for i in range(n)])
    # For each seen image i, the share of the other reconstructions j with r[i, j] < r[i, i].
    direct = np.mean([sum(r[i, j] < r[i, i] for j in range(n) if j != i) / (n - 1) for i in range(n)]) * 100
    column_wise = np.mean([sum(r[i, j] < r[j, j] for i in range(n) if i != j) / (n - 1) for j in range(n)]) * 100
    assert model_scores.two_way_identification(torch.tensor(real), torch.tensor(recon)) == pytest.approx(direct)
    assert direct != pytest.approx(column_wise)  # the orientation matters on these inputs
    assert model_scores.pearson_matrix(torch.tensor(real), torch.tensor(recon)).shape == (n, n)


def test_two_way_hand_case():
    real = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # recon 0 = real 0 (r=1 wins both), recon 1 = real 0 too (its own r=-1 loses both), recon 2 = real 2 (wins both).
    recon = torch.stack([real[0], real[0], real[2]])
    assert model_scores.two_way_identification(real, recon) == pytest.approx(100 * 2 / 3)


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


def test_ssim_columns_window_averages_1d_ssims_down_the_columns():
    rng = np.random.default_rng(11)
    a = rng.random((2, 3, 20, 20))
    b = np.clip(a + 0.2 * rng.normal(size=a.shape), 0, 1)
    r = np.arange(-5, 6)
    w = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = w / w.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def columns(x, y):  # 1-D SSIM of each column (over the positions whose window fits), then the mean
        values = []
        for c in range(x.shape[1]):
            for i in range(x.shape[0] - 10):
                px, py = x[i : i + 11, c], y[i : i + 11, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx ** 2, (w * py * py).sum() - my ** 2
                cxy = (w * px * py).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        return np.mean(values)

    gray = lambda im: 0.2125 * im[0] + 0.7154 * im[1] + 0.0721 * im[2]  # noqa: E731
    direct = np.mean([columns(gray(a[i]), gray(b[i])) for i in range(2)])
    assert metrics.ssim(torch.tensor(a), torch.tensor(b), size=20, window="columns") == pytest.approx(direct, abs=1e-9)
    with pytest.raises(MetricInputError, match="unknown window"):
        metrics.ssim(torch.tensor(a), torch.tensor(b), window="3d")


def test_resize_conventions():
    torch.manual_seed(12)
    x = torch.rand(2, 3, 64, 64)
    # Enlarging is the same in both conventions; shrinking differs (antialiasing low-pass filters).
    torch.testing.assert_close(resize(x, 100), resize(x, 100, convention="antialias"), rtol=0, atol=1e-5)
    assert (resize(x, 40) - resize(x, 40, convention="antialias")).abs().max() > 0.05
    # The reference convention samples 2 x 2 input pixels per output pixel: halving averages 2 x 2 blocks.
    torch.testing.assert_close(resize(x, 32), x.view(2, 3, 32, 2, 32, 2).mean((3, 5)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown resize convention"):
        resize(x, 32, convention="pil")


@pytest.mark.parametrize("size", [48, 20])
def test_resize_like_pil_is_pils_8_bit_bicubic(size):
    rng = np.random.default_rng(13)
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    pil = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)).astype(np.float64)
    ours = resize_like_pil(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size)[0].permute(1, 2, 0) * 255
    diff = np.abs(ours.double().numpy() - pil)
    assert diff.max() <= 1 + 1e-4 and (diff > 1e-4).mean() < 0.01


def test_n_way_top1_hand_cases():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    assert metrics.n_way_top1(probs, probs, n_way=4) == {"mean": 100.0, "best": 100.0}
    wrong = probs.flip(1)  # the true class is never the highest
    assert metrics.n_way_top1(probs, wrong, n_way=4, n_trials=10) == {"mean": 0.0, "best": 0.0}
    # 2-way: gen image 0 ranks its true class 2nd of 4, so it wins against 2 of the 3 others.
    gen = torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.0, 0.0, 1.0, 0.0]])
    got = metrics.n_way_top1(probs, gen, n_way=2, n_trials=3000)
    assert got["mean"] == got["best"] == pytest.approx((2 / 3 + 1) / 2 * 100, abs=1.5)
    # A tie with the true class counts as correct (the reference's argmax takes the true class, listed first).
    tied = torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    assert metrics.n_way_top1(probs, tied, n_way=4, n_trials=5)["mean"] == 100.0
    # Generations: the mean and the best generation.
    gens = torch.stack([probs, wrong], 1)
    assert metrics.n_way_top1(probs, gens, n_way=4, n_trials=5) == {"mean": 50.0, "best": 100.0}
    with pytest.raises(MetricInputError, match="between 2 and the 4 classes"):
        metrics.n_way_top1(probs, gen, n_way=5)


def test_n_way_top1_draws_numpys_legacy_stream_in_the_reference_order():
    rng = np.random.default_rng(9)
    real, gen = torch.tensor(rng.random((3, 12))), torch.tensor(rng.random((3, 2, 12)))
    np.random.seed(5)  # the reference's global generator, drawn generation by generation, image by image
    accuracy = []
    for g in range(2):
        per_image = []
        for i in range(3):
            t = int(real[i].argmax())
            draws = [np.random.choice([c for c in range(12) if c != t], 4, replace=False) for _ in range(7)]
            per_image.append(np.mean([gen[i, g, t] >= gen[i, g, d].max() for d in draws]))
        accuracy.append(np.mean(per_image) * 100)
    got = metrics.n_way_top1(real, gen, n_way=5, n_trials=7, seed=5)
    assert got == pytest.approx({"mean": np.mean(accuracy), "best": max(accuracy)}, abs=1e-12)


def test_multilabel_hand_cases():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.8, 0.7, 0.6], [0.3, 0.6, 0.6], [0.1, 0.1, 0.6]])
    labels = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]]).float()
    # Class 0: ranking .9(+) .8(-) .3(+) .1(-): AP = (1/1 + 2/3) / 2; AUC = 3 of 4 pos-neg pairs.
    # Classes 1 and 2 have no negative: AP is 1 for both, AUC leaves them out.
    assert model_scores.multilabel_map(scores, labels) == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3, abs=1e-6)
    assert model_scores.multilabel_auc(scores, labels) == pytest.approx(0.75, abs=1e-6)
    # Hamming at 0.5: predictions [1,0,1],[1,1,1],[0,1,1],[0,0,1] vs labels -> 4 disagreements of 12;
    # a score of exactly 0.5 predicts 1 (CLIP-MUSED's `ge(0.5)`).
    assert model_scores.hamming_loss(scores, labels) == pytest.approx(4 / 12)
    assert model_scores.hamming_loss(torch.full((2, 2), 0.5), torch.ones(2, 2)) == 0.0
    assert model_scores.hamming_loss(torch.full((2, 2), 0.5), torch.zeros(2, 2)) == 1.0
    no_positive = labels.clone()
    no_positive[:, 2] = 0
    # A class without positives is left out of mAP (here AP of class 2 would be undefined).
    assert model_scores.multilabel_map(scores, no_positive) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2, abs=1e-6)


def test_multilabel_auc_matches_pairwise_formula():
    rng = np.random.default_rng(6)
    scores, labels = rng.random((40, 6)), (rng.random((40, 6)) > 0.6).astype(float)
    labels[:, 5] = 1  # one class without negatives: excluded
    aucs = []
    for c in range(5):
        pos, neg = scores[labels[:, c] == 1, c], scores[labels[:, c] == 0, c]
        aucs.append(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))
    assert model_scores.multilabel_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(np.mean(aucs), abs=1e-6)


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
    full = model_scores.retrieval(brain, image, n_way=120, n_trials=1)
    sims = torch.nn.functional.normalize(brain) @ torch.nn.functional.normalize(image).T
    own = sims.diagonal()
    rank = (sims >= own[:, None]).sum(1) - 1
    assert full["forward_top5_full"] == pytest.approx((rank < 5).double().mean().item() * 100)
    assert full["forward_top1_full"] <= full["forward_top5_full"]
    monkeypatch.setattr(model_scores, "ELEMENT_BUDGET", 7 * 120)  # 7 queries per chunk
    assert model_scores.retrieval(brain, image, n_way=120, n_trials=1) == full
    top = model_scores.top_k_indices(brain, image, 5)
    assert torch.equal(top, sims.topk(5, dim=1).indices)


@pytest.mark.parametrize("fn", [model_scores.two_way_identification, metrics.correlation_distance, model_scores.retrieval,
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
