import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from data.clip_weights import config_weights, read_clip_weights
from data.pretrained_weights import WeightsMissing
from models.clip_image import CLIP_MEAN, CLIP_STD, build_clip_image, clip_preprocess
from train.config import ConfigError

TINY = dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, output_dim=16)
MEAN, STD = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_random_encoder_is_fixed_by_seed_and_gives_cls_normalised_tokens():
    images = torch.randint(0, 256, (3, 48, 40, 3), dtype=torch.uint8)
    a = build_clip_image("tiny", None, "tokens", seed=1, tiny=TINY)(images)
    b = build_clip_image("tiny", None, "tokens", seed=1, tiny=TINY)(images)
    c = build_clip_image("tiny", None, "tokens", seed=2, tiny=TINY)(images)
    assert a.shape == (3, 17, 16) and torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(a[:, 0].norm(dim=-1), torch.ones(3))
    pooled = build_clip_image("tiny", None, "pooled", seed=1, tiny=TINY)(images)
    assert pooled.shape == (3, 1, 16)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3, 1))
    quick = build_clip_image("tiny", None, "tokens", quick_gelu=True, seed=1, tiny=TINY)
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_preprocessing_follows_torchvision_size_and_crop_rounding():
    """A 40 x 49 image to 32 px: the long side becomes int(39.2) = 39 and the crop starts at
    column round(3.5) = 4, as in torchvision; uint8 and float input agree; no clamping unless
    antialiased."""
    images = torch.randint(0, 256, (1, 40, 49, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = images.permute(0, 3, 1, 2).float() / 255
    out = clip_preprocess(images, 32, MEAN, STD)
    expected = F.interpolate(x, size=(32, 39), mode="bicubic", align_corners=False)[..., 4:36]
    torch.testing.assert_close(out, (expected - MEAN) / STD, rtol=0, atol=0)
    torch.testing.assert_close(clip_preprocess(x, 32, MEAN, STD), out, rtol=0, atol=0)
    raw = clip_preprocess(images, 32, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    assert raw.min() < 0 or raw.max() > 1  # bicubic overshoot is kept, as MindEye 1 kept it
    clamped = clip_preprocess(images, 32, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), antialias=True)
    assert clamped.min() >= 0 and clamped.max() <= 1


def test_open_clip_weights_file_loads_the_named_architecture(tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path / "vit_b32.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)  # a training checkpoint
    weights = read_clip_weights(path, ConfigError, "clip.weights")
    assert weights.quick_gelu is None  # a bare state dict does not say
    encoder = build_clip_image("ViT-B-32", weights.state, "tokens", quick_gelu=False)
    assert encoder.target_shape == (50, 512)
    torch.testing.assert_close(encoder.visual.proj, model.visual.proj)
    assert encoder(torch.rand(2, 3, 256, 256)).shape == (2, 50, 512)
    with pytest.raises(ValueError, match="is built with QuickGELU, but the weights use GELU"):
        build_clip_image("ViT-B-32-quickgelu", weights.state, "tokens", quick_gelu=False)


def test_bad_settings_name_the_file_and_the_key(tmp_path):
    with pytest.raises(WeightsMissing) as e:
        config_weights(str(tmp_path / "nope.bin"), "auto", ConfigError)
    assert "nope.bin" in str(e.value) and "clip.weights" in str(e.value)
    with pytest.raises(ConfigError, match="clip.weights is not set"):
        config_weights("", "auto", ConfigError)
    with pytest.raises(ConfigError, match="clip.activation: 'relu'"):
        config_weights("random", "relu", ConfigError)
    assert config_weights("random", "auto", ConfigError) == (None, False)
    with pytest.raises(ValueError, match="clip.target"):
        build_clip_image("tiny", None, "cls", tiny=TINY)
    with pytest.raises(ValueError, match="clip.tiny"):
        build_clip_image("ViT-L-14", None, "tokens")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        build_clip_image("ViT-Q-99", {}, "tokens")
