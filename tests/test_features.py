"""Feature extractors: reference layers and sizes, local weight files, one pass per model."""
import pytest
import torch
import torchvision.models as tvm
from torchvision.models.vision_transformer import VisionTransformer

from eval import features
from eval.features import (
    SPECS,
    WeightsMissing,
    build_extractor,
    extract,
    locate_weights,
)
from eval.report import ImageMetricOptions, image_metrics

SHAPES = {  # at the reference input sizes
    "alexnet": {"alexnet2": (192, 31, 31), "alexnet5": (256, 15, 15)},
    "inception": {"inception": (2048, 1, 1), "inception_logits": (1000,)},
    "effnet": {"effnet": (1280, 1, 1)},
    "swav": {"swav": (2048, 1, 1)},
    "clip": {"clip": (768,)},
    "vit_h_14": {"vit_h_14_logits": (1000,)},
}


def _small_vit(image_size: int = 224) -> VisionTransformer:
    """ViT-H/14's class at 518 px with 1 layer 16 wide: the same code path, in a fraction of
    the time (the real one takes minutes to build and run on 2 CPU cores)."""
    return VisionTransformer(image_size=image_size, patch_size=14, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)


@pytest.fixture(autouse=True)
def small_vit(monkeypatch):
    monkeypatch.setattr(tvm, "vit_h_14", _small_vit)


@pytest.mark.parametrize("name", list(SHAPES))
def test_extractor_layers_and_sizes(name):
    torch.manual_seed(0)
    model = build_extractor(name, "random")
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    out = extract(torch.rand(2, 3, 256, 256), {name: model}, torch.device("cpu"), batch_size=2)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == SHAPES[name]
    assert seen == [(2, 3, SPECS[name].size, SPECS[name].size)]


def test_weights_are_found_in_the_hub_folder_and_loaded(tmp_path):
    torch.manual_seed(1)
    net = tvm.alexnet()
    torch.save(net.state_dict(), tmp_path / SPECS["alexnet"].weights_file)
    path = locate_weights("alexnet", None, [tmp_path / "elsewhere", tmp_path])
    assert path == tmp_path / SPECS["alexnet"].weights_file
    images = torch.rand(3, 3, 256, 256)
    got = extract(images, {"alexnet": build_extractor("alexnet", path)}, torch.device("cpu"))
    expected = net.eval().features[:5](features.preprocess(images, SPECS["alexnet"]))
    assert torch.allclose(got["alexnet2"], expected, atol=1e-5)


def test_swav_file_with_prefix_and_heads_loads(tmp_path):
    torch.manual_seed(2)
    trunk = tvm.resnet50()
    state = {f"module.{k}": v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)  # SwAV's heads are ignored
    path = tmp_path / "swav.pth.tar"
    torch.save(state, path)
    model = build_extractor("swav", path)
    images = torch.rand(2, 3, 256, 256)
    trunk.fc = torch.nn.Identity()
    expected = trunk.eval()(features.preprocess(images, SPECS["swav"]))
    assert torch.allclose(extract(images, {"swav": model}, torch.device("cpu"))["swav"].flatten(1), expected, atol=1e-4)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsMissing, match=rf"{tmp_path}/alexnet-owt-7be5be79.pth.*--weights alexnet=PATH"):
        locate_weights("alexnet", None, [tmp_path])
    with pytest.raises(WeightsMissing, match="nope.pth: CLIP ViT-L/14 weights not found"):
        locate_weights("clip", str(tmp_path / "nope.pth"))
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMissing, match="broken.pth: not a readable EfficientNet-B1 checkpoint"):
        build_extractor("effnet", tmp_path / "broken.pth")
    torch.save(tvm.alexnet().state_dict(), tmp_path / "alex.pth")
    with pytest.raises(WeightsMissing, match="alex.pth: not a InceptionV3 checkpoint"):
        build_extractor("inception", tmp_path / "alex.pth")


def test_vit_h_14_loads_its_hub_file_and_gives_logits(tmp_path):
    torch.manual_seed(5)
    net = _small_vit(518).eval()
    assert SPECS["vit_h_14"].weights_file == "vit_h_14_swag-80465313.pth"  # torch.hub's name of the SWAG E2E weights
    torch.save(net.state_dict(), tmp_path / SPECS["vit_h_14"].weights_file)
    model = build_extractor("vit_h_14", locate_weights("vit_h_14", None, [tmp_path]))
    images = torch.rand(2, 3, 256, 256)
    got = extract(images, {"vit_h_14": model}, torch.device("cpu"))["vit_h_14_logits"]
    torch.testing.assert_close(got, net(features.preprocess(images, SPECS["vit_h_14"])), rtol=0, atol=1e-5)
    with pytest.raises(WeightsMissing, match=rf"{tmp_path}/elsewhere/vit_h_14_swag-80465313.pth: ViT-H/14 weights not "
                                             r"found \(put the file there, or pass --weights vit_h_14=PATH\)"):
        locate_weights("vit_h_14", None, [tmp_path / "elsewhere"])


def test_n_way_top1_defaults_to_vit_h_14_with_mean_and_best_generation():
    torch.manual_seed(6)
    ex = {"vit_h_14": build_extractor("vit_h_14", "random"), "inception": build_extractor("inception", "random")}
    truth = torch.rand(2, 3, 256, 256)
    recons = torch.stack([truth, torch.rand_like(truth)], 1)
    out = image_metrics(truth, recons, ex, ImageMetricOptions(extractors=tuple(ex), n_way_trials=20))
    assert out["vit_h_14_50way_top1_best"] == 100.0  # the first generation is the seen image itself
    assert 0 <= out["vit_h_14_50way_top1"] <= 100.0 and "inception_50way_top1" not in out
    other = image_metrics(truth, recons, ex, ImageMetricOptions(extractors=tuple(ex), n_way_trials=20, n_way_classifier="inception"))
    assert other["inception_50way_top1_best"] == 100.0 and "vit_h_14_50way_top1" not in other


def test_extraction_is_batch_independent():
    torch.manual_seed(3)
    ex = {"effnet": build_extractor("effnet", "random")}
    images = torch.rand(5, 3, 256, 256)
    one = extract(images, ex, torch.device("cpu"), batch_size=1)["effnet"]
    many = extract(images, ex, torch.device("cpu"), batch_size=5)["effnet"]
    assert torch.allclose(one, many, atol=1e-5)


def test_image_metrics_run_each_model_once_per_image_set():
    torch.manual_seed(4)
    names = ("alexnet", "effnet")
    ex = {n: build_extractor(n, "random") for n in names}
    calls = {n: 0 for n in names}
    for n, m in ex.items():
        m.register_forward_pre_hook(lambda mod, args, n=n: calls.__setitem__(n, calls[n] + 1))
    truth = torch.rand(6, 3, 256, 256)
    recons = torch.stack([truth, torch.rand_like(truth)], 1)  # 2 generations
    opts = ImageMetricOptions(extractors=names, batch_size=12)
    out = image_metrics(truth, recons, ex, opts)
    assert calls == {n: 2 for n in names}  # one batch of seen images, one of the 12 reconstructions
    assert set(out) == {"pixcorr", "ssim", "alexnet2", "alexnet5", "effnet"}
    exact = image_metrics(truth, truth, ex, opts)
    assert exact["pixcorr"] == pytest.approx(1) and exact["ssim"] == pytest.approx(1)
    assert exact["alexnet2"] == exact["alexnet5"] == 100.0 and exact["effnet"] == pytest.approx(0, abs=1e-5)
