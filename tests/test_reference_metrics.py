"""The eval metrics against the golden outputs of the reference metric code
(tests/fixtures/reference/make_metrics.py: MindEye 1, Brain-Diffuser, Takagi & Nishimoto,
CLIP-MUSED, MinD-Vis), within 1e-5, on the same inputs."""
import pytest
import torch

from eval import metrics
from models import scores
from eval.features import SPECS, preprocess
from eval.images import to_unit
from eval.resize import resize
from tests.conftest import load_reference as load

TOL = 1e-5


@pytest.fixture(scope="module")
def mindeye1():
    return load("metrics_mindeye1.pt")


def unit(u8: torch.Tensor) -> torch.Tensor:
    """8-bit images as the references' float tensors: value / 255 in float32."""
    return u8.float() / 255


def test_pixcorr_and_ssim_equal_mindeye(mindeye1):
    real, recon = unit(mindeye1["images"]), unit(mindeye1["recons"])
    assert metrics.pixcorr(real, recon) == pytest.approx(mindeye1["pixcorr"], abs=TOL)
    assert metrics.ssim(real, recon) == pytest.approx(mindeye1["ssim"], abs=TOL)
    # The same call computes 1-D column SSIMs on scikit-image 0.17-0.19 (see the Brain-Diffuser test): not MindEye's.
    assert abs(metrics.ssim(real, recon, window="columns") - mindeye1["ssim"]) > 1e-3


def test_two_way_identification_equals_mindeye(mindeye1):
    ours = scores.two_way_identification(mindeye1["two_way_real"], mindeye1["two_way_recon"])
    assert ours / 100 == pytest.approx(mindeye1["two_way"], abs=TOL)


def test_correlation_distance_equals_mindeye(mindeye1):
    ours = metrics.correlation_distance(mindeye1["distance_gt"], mindeye1["distance_fake"])
    assert ours == pytest.approx(mindeye1["distance"], abs=TOL)


def test_retrieval_equals_mindeye_with_its_direction_names_swapped(mindeye1):
    brain, image = mindeye1["retrieval_brain"], mindeye1["retrieval_image"]
    ours = scores.retrieval(brain, image, n_way=len(brain), n_trials=1)
    # MindEye's "bwd" ranks images for each brain embedding: our forward (image retrieval).
    assert ours["forward_top1_full"] / 100 == pytest.approx(mindeye1["retrieval_bwd_top1"], abs=TOL)
    assert ours["backward_top1_full"] / 100 == pytest.approx(mindeye1["retrieval_fwd_top1"], abs=TOL)
    assert ours["forward_top5_full"] / 100 == pytest.approx(mindeye1["retrieval_bwd_top5"], abs=TOL)
    assert ours["backward_top5_full"] / 100 == pytest.approx(mindeye1["retrieval_fwd_top5"], abs=TOL)


def _at(ours: torch.Tensor, ref: dict) -> torch.Tensor:
    assert tuple(ours.shape) == tuple(ref["shape"].tolist())
    return ours.flatten()[ref["index"]]


def test_resizing_and_preprocessing_equal_mindeyes_transforms(mindeye1):
    """torchvision 0.15.2 `transforms.Resize` (no antialiasing for tensors) and `Normalize`,
    as MindEye's metric code composed them, against ours on a 320 px and a 256 px image."""
    t = mindeye1["transforms"]
    shrink, full = unit(mindeye1["transform_shrink_input"]), unit(mindeye1["transform_input"])
    torch.testing.assert_close(_at(to_unit(shrink, "fixture"), t["to_256"]), t["to_256"]["values"], rtol=0, atol=TOL)
    torch.testing.assert_close(_at(resize(shrink, 425), t["pixcorr_shrink"]), t["pixcorr_shrink"]["values"], rtol=0, atol=TOL)
    for name in ("pixcorr", "ssim"):
        torch.testing.assert_close(_at(resize(full, 425), t[name]), t[name]["values"], rtol=0, atol=TOL)
    for name in ("alexnet", "inception", "clip", "effnet", "swav"):
        assert f"Resize({SPECS[name].size}, interpolation=transforms.InterpolationMode.BILINEAR)" in t[name]["text"]
        torch.testing.assert_close(_at(preprocess(full, SPECS[name]), t[name]), t[name]["values"], rtol=0, atol=TOL)
    # Antialiasing is the other convention: it changes every shrunk image.
    assert (_at(to_unit(shrink, "fixture", "antialias"), t["to_256"]) - t["to_256"]["values"]).abs().max() > 1e-2
    assert (_at(preprocess(full, SPECS["clip"], "antialias"), t["clip"]) - t["clip"]["values"]).abs().max() > 1e-2


def test_pixcorr_ssim_and_two_way_equal_brain_diffuser():
    """Brain-Diffuser's own scores (scikit-image 0.17.2): its SSIM call is 1-D SSIMs down the columns."""
    ref = load("metrics_brain_diffuser.pt")
    gt, gen = (x.permute(0, 3, 1, 2).double() / 255 for x in (ref["gt"], ref["gen"]))
    size = gt.shape[-1]  # the images are scored at their own size
    assert metrics.pixcorr(gt, gen, size=size) == pytest.approx(ref["pixcorr"], abs=TOL)
    assert metrics.ssim(gt, gen, size=size, window="columns") == pytest.approx(ref["ssim"], abs=TOL)
    assert abs(metrics.ssim(gt, gen, size=size) - ref["ssim"]) > 1e-3
    assert scores.two_way_identification(ref["two_way_real"], ref["two_way_pred"]) / 100 == pytest.approx(ref["two_way"], abs=TOL)


def test_two_way_over_generations_equals_takagi():
    """Takagi & Nishimoto's identification: r averaged over 5 generations, row-wise."""
    ref = load("metrics_takagi.pt")
    assert scores.two_way_identification(ref["original"], ref["generated"]) / 100 == pytest.approx(ref["two_way"], abs=TOL)


def test_multilabel_scores_equal_clip_mused_except_undefined_classes():
    ref = load("metrics_clip_mused.pt")
    probs, labels = ref["probs"], ref["labels"]
    assert (probs == 0.5).any()  # predicted positive at >= 0.5
    assert scores.hamming_loss(probs, labels) == pytest.approx(ref["hamming"], abs=TOL)
    positives = labels.sum(0)
    has_positive, has_both = positives > 0, (positives > 0) & (positives < len(labels))
    assert scores.multilabel_map(probs, labels) == pytest.approx(ref["ap_per_class"][has_positive].mean().item(), abs=TOL)
    assert scores.multilabel_auc(probs, labels) == pytest.approx(ref["auc_per_class"][has_both].mean().item(), abs=TOL)
    # The deliberate differences: the reference scores a class without positives AP 0, and a
    # class without both labels AUC 1.0, and its means count them.
    assert ref["ap_per_class"][~has_positive].tolist() == [0.0]
    assert ref["auc_per_class"][~has_both].tolist() == [1.0, 1.0]


def test_n_way_top1_equals_mind_vis():
    """50-way top-1 over 1000 trials with numpy's legacy generator seeded alike: the same
    draws, so the same numbers; generations of image 0 tie the true class with 100 others."""
    ref = load("metrics_mind_vis.pt")
    ours = metrics.n_way_top1(ref["real_probs"], ref["gen_probs"], n_way=50, n_trials=1000, seed=0)
    assert ours["mean"] == pytest.approx(ref["top1_mean"], abs=TOL)
    assert ours["best"] == pytest.approx(ref["top1_best"], abs=TOL)


def test_vit_h_14_preprocessing_matches_its_pil_transforms():
    """ViT_H_14_Weights.DEFAULT.transforms() resized an 8-bit PIL image; ours agrees to
    within one 8-bit level, on all but a few values in 10,000."""
    ref = load("metrics_mind_vis.pt")
    spec = SPECS["vit_h_14"]
    x = preprocess(unit(ref["vit_transform_input"].permute(2, 0, 1))[None], spec)[0]
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    ours = ((x * std + mean) * 255).round()
    diff = (ours - ref["vit_transform_resized"].float()).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3


def test_fid_equals_torchmetrics_of_mind_vis():
    ref = load("metrics_mind_vis.pt")
    assert metrics.fid(ref["fid_real"], ref["fid_fake"]) == pytest.approx(ref["fid"], rel=TOL)
