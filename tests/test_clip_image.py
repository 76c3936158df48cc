import open_clip
import pytest
import torch

from models.clip_image import build_clip_image

TINY = dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, output_dim=16)


def test_random_encoder_is_fixed_by_seed_and_gives_cls_normalised_tokens():
    images = torch.randint(0, 256, (3, 48, 40, 3), dtype=torch.uint8)
    a = build_clip_image("tiny", "random", "tokens", seed=1, tiny=TINY)(images)
    b = build_clip_image("tiny", "random", "tokens", seed=1, tiny=TINY)(images)
    c = build_clip_image("tiny", "random", "tokens", seed=2, tiny=TINY)(images)
    assert a.shape == (3, 17, 16) and torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(a[:, 0].norm(dim=-1), torch.ones(3))
    pooled = build_clip_image("tiny", "random", "pooled", seed=1, tiny=TINY)(images)
    assert pooled.shape == (3, 1, 16)


def test_local_weights_file_loads_the_named_architecture(tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path / "vit_b32.pt"
    torch.save(model.state_dict(), path)
    encoder = build_clip_image("ViT-B-32", str(path), "tokens")
    assert encoder.target_shape == (50, 512)
    torch.testing.assert_close(encoder.visual.proj, model.visual.proj)
    out = encoder(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 50, 512)


def test_missing_weights_name_the_file_and_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_clip_image("ViT-L-14", str(tmp_path / "nope.bin"), "tokens")
    assert "nope.bin" in str(e.value) and "clip.weights" in str(e.value)
    with pytest.raises(ValueError, match="clip.target"):
        build_clip_image("tiny", "random", "cls", tiny=TINY)
