import open_clip
import pytest
import torch

from models.clip_image import CLIP_MEAN, CLIP_STD, clip_preprocess
from models.clip_levels import build_clip_levels

TINY = {
    "embed_dim": 16,
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
    "text": {"context_length": 16, "vocab_size": 49408, "width": 32, "layers": 1, "heads": 2},
}
CAPTIONS = ["a cat on a mat", "two dogs running", "a red bus"]


def _images(seed=0):
    return torch.randint(0, 256, (3, 40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pixels(images, size=32):
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return clip_preprocess(images, size, mean, std, antialias=True)


def test_dims_and_seeding():
    images = _images()
    a = build_clip_levels("tiny", None, llv_pool=2, seed=1, tiny=TINY)
    out = a(images, CAPTIONS)
    assert (a.llv_dim, a.hlv_dim) == (2 * 2 * 32, 16) and out.shape == (3, 128 + 16) and out.dtype == torch.float32
    llv, hlv = a.split(out)
    assert llv.shape == (3, 128) and hlv.shape == (3, 16)
    assert torch.equal(out, build_clip_levels("tiny", None, llv_pool=2, seed=1, tiny=TINY)(images, CAPTIONS))
    assert not torch.allclose(out, build_clip_levels("tiny", None, llv_pool=2, seed=2, tiny=TINY)(images, CAPTIONS))
    assert build_clip_levels("tiny", None, llv_pool=1, tiny=TINY)(images, CAPTIONS).shape == (3, 32 + 16)
    assert not any(p.requires_grad for p in a.parameters()) and not a.model.training


def test_hlv_is_mean_of_normalised_image_and_text_embeddings():
    levels = build_clip_levels("tiny", None, seed=3, tiny=TINY)
    images = _images()
    llv, hlv = levels.split(levels(images, CAPTIONS))
    model, tok = levels.model, open_clip.tokenize(CAPTIONS, context_length=16)
    with torch.no_grad():
        img, txt = model.encode_image(_pixels(images), normalize=True), model.encode_text(tok, normalize=True)
    torch.testing.assert_close(hlv, (img + txt) / 2)
    llv2, hlv2 = levels.split(levels(images, ["something else entirely", *CAPTIONS[1:]]))
    assert torch.equal(llv2, llv) and torch.equal(hlv2[1:], hlv[1:]) and not torch.allclose(hlv2[0], hlv[0])


def test_llv_is_the_first_block_patch_tokens_pooled():
    levels = build_clip_levels("tiny", None, llv_pool=2, seed=4, tiny=TINY)
    images = _images(1)
    captured = []
    handle = levels.model.visual.transformer.resblocks[0].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        levels.model.encode_image(_pixels(images))
    handle.remove()
    patches = captured[0][:, 1:].reshape(3, 2, 2, 2, 2, 32)  # [B, gy, dy, gx, dx, width] on the 4 x 4 patch grid
    expected = patches.mean(dim=(2, 4)).permute(0, 3, 1, 2).flatten(1)  # [B, width, gy, gx]
    llv, _ = levels.split(levels(images, CAPTIONS))
    torch.testing.assert_close(llv, expected)


def test_bad_configs_name_the_setting():
    with pytest.raises(ValueError, match="clip.tiny"):
        build_clip_levels("tiny", None)
    with pytest.raises(ValueError, match="vocab_size"):
        build_clip_levels("tiny", None, tiny={**TINY, "text": {**TINY["text"], "vocab_size": 1000}})


def test_weights_need_both_towers():
    random = build_clip_levels("tiny", None, seed=5, tiny=TINY).model.state_dict()
    quick = build_clip_levels("tiny", random, quick_gelu=True, tiny=TINY)
    assert torch.equal(quick.model.visual.proj, random["visual.proj"])
    images = {k: v for k, v in random.items() if k.startswith("visual.")}
    with pytest.raises(ValueError, match="the weights lack positional_embedding"):
        build_clip_levels("tiny", images, tiny=TINY)
