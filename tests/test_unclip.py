"""MindEye 2's SDXL unCLIP against the golden outputs of its own code (tests/fixtures/reference/make_unclip.py):
an sgm-layout checkpoint file loads through data/unclip_weights.py into diffusers' UNet2DConditionModel, which
computes what sgm's UNetModel computed; the Euler sampling on diffusers' scheduler reproduces sgm's sampler and
`utils.unclip_recon`; a checkpoint that does not fit is one error line."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from data.pretrained_weights import WeightsError, WeightsMissing
from data.unclip_weights import load_unclip_unet
from models.image_variation import tiny_vae
from models.ldm_keys import unet_to_diffusers
from models.unclip_sgm import (
    SMALL,
    UNCLIP6,
    random_unclip_unet,
    size_condition,
    unclip_denoise,
    unclip_images,
    unclip_sample,
    unclip_scheduler,
    unet_config,
)
from tests.conftest import load_reference
from tests.test_reference_mindeye2 import close  # within 1e-5 of the reference output's scale

UNET_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def ref():
    return load_reference("mindeye2_unclip.pt.xz")


@pytest.fixture(scope="module")
def unet(ref, tmp_path_factory):
    """The fixture's checkpoint as a file in sgm's layout, loaded through the import path."""
    path = tmp_path_factory.mktemp("unclip") / "unclip.ckpt"
    torch.save({"state_dict": ref["state_dict"], "global_step": 110000}, path)
    return load_unclip_unet(str(path), network=ref["network_config"])


@torch.no_grad()
def test_the_sgm_unet_in_diffusers_computes_the_reference_output(ref, unet):
    assert isinstance(unet, UNet2DConditionModel) and unet.config.class_embed_type == "projection"
    f = ref["forward"]
    out = unet(f["x"], f["timesteps"], encoder_hidden_states=f["context"], class_labels=f["y"]).sample
    close(out, f["output"])


def test_the_size_condition_is_the_conditioners_vector(ref):
    v = ref["vector"]
    close(size_condition(v["original_size"], v["crop"]), v["vector"])


def test_every_entry_of_the_full_size_checkpoint_layout_maps_onto_the_diffusers_unet(ref):
    """unclip6.yaml's UNet at full size (its names and shapes from sgm on the meta device)."""
    assert {k: v for k, v in ref["unclip6"]["network_config"].items() if k in UNCLIP6} == UNCLIP6
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config())
    state = {k: torch.empty(shape, device="meta") for k, shape in ref["unclip6"]["shapes"].items()}
    assert len(unet_to_diffusers(state, unet)) == len(unet.state_dict()) == len(state)
    assert sum(p.numel() for p in unet.parameters()) == 2_501_272_324


def test_the_scheduler_takes_sgms_timesteps_and_sigmas(ref):
    scheduler = unclip_scheduler(38)
    sigmas = ref["sigmas"]["sampler_38"]
    torch.testing.assert_close(scheduler.sigmas, sigmas, rtol=1e-5, atol=0)
    table = ref["sigmas"]["denoiser"]  # sgm's 1000 sigmas, index = timestep
    assert scheduler.timesteps.long().tolist() == [int((table - s).abs().argmin()) for s in sigmas[:-1]]


def test_euler_sampling_with_guidance_reproduces_sgms_sampler(ref, unet):
    s = ref["sampler"]
    scheduler = unclip_scheduler(s["num_steps"])
    start = s["x"] * (1 + scheduler.sigmas[0] ** 2) ** 0.5  # sgm's sampler scales its input so
    close(unclip_denoise(unet, start, s["cond"], s["uncond"], s["vector"], scheduler, s["scale"]), s["output"])


def test_sampling_from_a_seed_reproduces_unclip_recon(ref, unet):
    r = ref["unclip_recon"]
    latents = unclip_sample(unet, r["tokens"], r["vector"], [torch.Generator().manual_seed(r["seed"])], r["num_steps"],
                            r["scale"], offset_noise=r["offset_noise_level"])
    close(latents, r["latents"])
    close(unclip_images(r["latents"]), r["images"])  # its stand-in for the VAE returns the latents


def bad_file(tmp_path, ref, change) -> str:
    state = dict(ref["state_dict"])
    change(state)
    path = tmp_path / "unclip.ckpt"
    torch.save({"state_dict": state}, path)
    return str(path)


@pytest.mark.parametrize("change, says", [
    (lambda s: s.pop(UNET_KEY), "lack the entry of diffusers' down_blocks.1.attentions.0.transformer_blocks.0.attn2"),
    (lambda s: s.pop("model.diffusion_model.label_emb.0.0.bias"), "lack model.diffusion_model.label_emb.0.0.bias"),
    (lambda s: s.update({UNET_KEY: torch.zeros(64, 2048)}), f"{UNET_KEY} is [64, 2048] in the weights, [64, 1664] in"),
    (lambda s: s.update({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(128, 2816)}),
     "label_emb.0.0.weight is [128, 2816] in the weights, [128, 1024] in the unCLIP UNet"),
    (lambda s: s.update({"model.diffusion_model.extra.weight": torch.zeros(1)}),
     "hold model.diffusion_model.extra.weight, which diffusers' converter does not map"),
    (lambda s: [s.update({k.replace("model.diffusion_model.", "unet."): s.pop(k)}) for k in list(s)],
     "no model.diffusion_model.* entries"),
])
def test_a_checkpoint_that_does_not_fit_is_one_error_line(tmp_path, ref, change, says):
    path = bad_file(tmp_path, ref, change)
    with pytest.raises(WeightsError) as e:
        load_unclip_unet(path, network=ref["network_config"])
    message = str(e.value)
    assert "\n" not in message and message.startswith(path) and says in message and "generation.unclip" in message


def test_a_missing_checkpoint_names_the_file_and_the_key(tmp_path):
    with pytest.raises(WeightsMissing, match="nothing.ckpt: unCLIP checkpoint not found .set generation.unclip"):
        load_unclip_unet(str(tmp_path / "nothing.ckpt"))


def test_generation_from_random_tokens_depends_on_each_rows_seed_alone():
    """A small random unCLIP UNet and VAE, images of two rows from two seeds, then with row 0's seed changed."""
    unet, vae = random_unclip_unet(dict(UNCLIP6, **SMALL, context_dim=32), seed=1), tiny_vae(8)
    tokens, vector = torch.randn(2, 16, 32), size_condition(torch.tensor([[768.0, 768.0]]), torch.zeros(1, 2))[0]

    def images(seeds):
        latents = unclip_sample(unet, tokens, vector, [torch.Generator().manual_seed(s) for s in seeds], steps=2,
                                latent_size=8)
        with torch.no_grad():
            return unclip_images(vae.decode(latents / vae.config.scaling_factor).sample)

    first, second = images([3, 4]), images([5, 4])
    assert first.shape == (2, 3, 32, 32) and 0 <= first.min() and first.max() <= 1 and first.std() > 0
    assert torch.equal(second[1], first[1])
    assert (second[0] - first[0]).abs().max() > 0.01
