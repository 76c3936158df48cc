"""The generation stage on a tiny random pipeline: shapes, determinism, guidance, img2img, loading."""
from __future__ import annotations

import shutil

import pytest
import torch

from data.diffusers_weights import load_image_variation
from data.pretrained_weights import WeightsMissing
from models.errors import InputError
from models.image_variation import tiny_image_variation

T, D = 5, 64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_image_variation(D)


@pytest.fixture(scope="module")
def tokens():
    g = gen(123)
    return torch.randn(2, T, D, generator=g), torch.randn(2, T, D, generator=g), torch.zeros(1, T, D)


@pytest.fixture(scope="module")
def reference(pipe, tokens):
    embeds, _, uncond = tokens
    return pipe(embeds, uncond, steps=4, n_samples=2, generator=gen(0))


def test_shapes_and_range(reference):
    assert reference.shape == (2, 2, 3, 64, 64)
    assert reference.dtype == torch.float32
    assert reference.min() >= 0 and reference.max() <= 1
    assert reference.std() > 0.01  # not a blank image
    assert not torch.equal(reference[:, 0], reference[:, 1])  # the samples of one embedding differ


def test_samples_belong_to_their_embedding(pipe, tokens, reference):
    """reference[j, i] is sample i of embedding j: the same as repeating each embedding n times."""
    embeds, _, uncond = tokens
    repeated = pipe(embeds.repeat_interleave(2, 0), uncond, steps=4, generator=gen(0))
    assert torch.equal(repeated.view(reference.shape), reference)


def test_tiny_pipeline_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    tiny_image_variation(D, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_deterministic_given_generator(pipe, tokens, reference):
    embeds, _, uncond = tokens
    assert torch.equal(pipe(embeds, uncond, steps=4, n_samples=2, generator=gen(0)), reference)
    other = pipe(embeds, uncond, steps=4, n_samples=2, generator=gen(1))
    assert (other - reference).abs().mean() > 1e-3


def test_guidance_and_conditioning_matter(pipe, tokens, reference):
    embeds, other_embeds, uncond = tokens
    unguided = pipe(embeds, uncond, steps=4, n_samples=2, guidance=1, generator=gen(0))
    assert (unguided - reference).abs().mean() > 1e-3
    other = pipe(other_embeds, uncond, steps=4, n_samples=2, generator=gen(0))
    assert (other - reference).abs().mean() > 1e-3
    # A per-embedding uncond equal to the shared one changes nothing.
    per_item = pipe(embeds, uncond.expand(2, -1, -1), steps=4, n_samples=2, generator=gen(0))
    assert torch.equal(per_item, reference)


def test_img2img_strength(pipe, tokens):
    embeds, _, uncond = tokens
    assert pipe.encode(torch.rand(3, 3, 64, 64)).shape == (3, 4, 16, 16)
    init = torch.randn(2, 4, 16, 16, generator=gen(7))  # scaled SD latents have about unit variance
    target = pipe.decode(init)
    assert target.shape == (2, 3, 64, 64)

    def run(**kwargs) -> torch.Tensor:
        return pipe(embeds, uncond, steps=5, generator=gen(0), **kwargs)[:, 0]

    near = (run(init_latents=init, strength=0.2) - target).abs().mean()
    from_noise = run()
    assert near < 0.6 * (from_noise - target).abs().mean()
    # Strength 1 ignores the init latents: it is generation from pure noise.
    assert torch.equal(run(init_latents=init, strength=1.0), from_noise)
    with pytest.raises(ValueError, match="no step"):
        pipe(embeds, uncond, steps=4, init_latents=init, strength=0.1)


def test_encode_decode_round_trip(pipe):
    latents = pipe.encode(torch.rand(2, 3, 64, 64))
    images = pipe.decode(latents)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(pipe.encode(images), pipe.encode(images))  # posterior mean, no sampling


def test_load_versatile_diffusion_layout(pipe, tokens, reference, tmp_path):
    pipe.unet.save_pretrained(tmp_path / "image_unet")
    pipe.vae.save_pretrained(tmp_path / "vae")
    pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = load_image_variation(str(tmp_path), cross_attention_dim=D)
    assert (tmp_path / "image_unet" / "config.json").is_file()
    embeds, _, uncond = tokens
    assert torch.equal(loaded(embeds, uncond, steps=4, n_samples=2, generator=gen(0)), reference)

    with pytest.raises(ValueError) as info:
        load_image_variation(str(tmp_path), cross_attention_dim=D + 1)
    assert all(s in str(info.value) for s in (str(tmp_path), f" {D},", f" {D + 1}"))

    shutil.move(tmp_path / "image_unet", tmp_path / "unet")  # Stable Diffusion layout
    sd = load_image_variation(str(tmp_path))
    assert torch.equal(sd(embeds, uncond, steps=4, n_samples=2, generator=gen(0)), reference)


def test_missing_weights(pipe, tmp_path):
    missing = tmp_path / "vd"
    with pytest.raises(WeightsMissing) as info:
        load_image_variation(str(missing))
    assert str(missing) in str(info.value) and "generation.weights" in str(info.value)
    assert isinstance(info.value, InputError)

    (missing / "vae").mkdir(parents=True)
    (missing / "scheduler").mkdir()
    with pytest.raises(WeightsMissing, match="generation.weights"):
        load_image_variation(str(missing))

    # Configs without weight files: an error, never a randomly initialised model.
    pipe.unet.save_config(missing / "unet")
    pipe.vae.save_config(missing / "vae")
    pipe.scheduler.save_pretrained(missing / "scheduler")
    with pytest.raises(WeightsMissing, match="generation.weights"):
        load_image_variation(str(missing))

    with pytest.raises(ValueError, match="cross_attention_dim"):
        load_image_variation("random")
    assert load_image_variation("random", cross_attention_dim=D).unet.config.cross_attention_dim == D
