"""MindEye 2's SDXL unCLIP (`unclip6_epoch0_step110000.ckpt`, Stability's sgm layout) as a diffusers
`UNet2DConditionModel`, and its sampler on diffusers' Euler scheduler.

The UNet is sgm's `UNetModel` of MindEye 2's `configs/unclip6.yaml`: SDXL's at cross-attention width
1664 (the 256 OpenCLIP ViT-bigG/14 patch tokens) with a 1024-wide vector condition (the size and crop
embeddings). diffusers' own converter of LDM/sgm UNets (`single_file_utils`) gives its config and key
names; for this context width it chooses `class_embed_type="projection"`, whose `class_embedding`
(Linear, SiLU, Linear, added to the time embedding) is sgm's `label_emb` applied to the same vector
(SDXL's `addition_embed_type="text_time"` with a zero-width text embedding gives the same output from
the four numbers; the projection takes sgm's input as it is).

Sampling reproduces MindEye 2's `utils.unclip_recon` with sgm's `EulerEDMSampler` (no churn) over
`LegacyDDPMDiscretization` with a `DiscreteDenoiser` (epsilon prediction): diffusers'
`EulerDiscreteScheduler` on SD's scaled-linear schedule given sgm's integer timesteps computes the same
steps; its noise table is computed in float32 where sgm's is float64 (sigmas differ by up to 3.4e-6 relative).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
from diffusers.models.embeddings import get_timestep_embedding

from models.ldm_keys import unet_to_diffusers

# `model.params.network_config.params` of configs/unclip6.yaml (its `use_checkpoint` and attention kernel
# choose how, not what, it computes)
UNCLIP6 = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
               channel_mult=[1, 2, 4], num_head_channels=64, use_linear_in_transformer=True,
               transformer_depth=[1, 2, 10], context_dim=1664, num_classes="sequential", adm_in_channels=1024)
SMALL = dict(model_channels=32, num_head_channels=16, transformer_depth=[1, 1, 2])  # random UNets of tests and demos
VAE_CH_MULT = [1, 2, 4, 4]  # the first stage's (SDXL's VAE: latents 8x smaller than the image)
LATENT_SIZE = 96  # unclip_recon's: 768-pixel images
OFFSET_NOISE = 0.04  # unclip6.yaml's offset_noise_level, which unclip_recon adds to its start
# sgm's LegacyDDPMDiscretization (SD's noise schedule); DiscreteDenoiser with EpsScaling
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")
SIZE_EMBEDDING = 256  # ConcatTimestepEmbedderND's outdim, per number


def unet_config(network: dict = UNCLIP6) -> dict:
    """The diffusers UNet config of an sgm `UNetModel` config, by diffusers' converter."""
    ldm = {"model": {"params": {"network_config": {"params": network},
                                "first_stage_config": {"params": {"ddconfig": {"ch_mult": VAE_CH_MULT}}}}}}
    return dict(create_unet_diffusers_config_from_ldm(ldm, {}), sample_size=LATENT_SIZE)


def unclip_unet(state: dict[str, torch.Tensor], network: dict = UNCLIP6) -> UNet2DConditionModel:
    """The unCLIP UNet of `network` (unclip6.yaml's; tests give smaller widths) with the weights of an
    sgm checkpoint's state dict, in eval mode."""
    unet = UNet2DConditionModel.from_config(unet_config(network))
    unet.load_state_dict(unet_to_diffusers(state, unet, "unCLIP UNet"))
    return unet.eval()


def random_unclip_unet(network: dict, seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised unCLIP UNet of `network` (e.g. `dict(UNCLIP6, **SMALL, context_dim=64)`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(unet_config(network)).eval()


def size_condition(original_size: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """sgm's vector condition of unclip6 ([B, 2] original (height, width) and crop (top, left) -> [B, 1024]):
    each number's sinusoidal embedding (cos first) of width 256, concatenated in that order."""
    numbers = torch.cat([original_size, crop], dim=1)
    embedded = get_timestep_embedding(numbers.flatten(), SIZE_EMBEDDING, flip_sin_to_cos=True, downscale_freq_shift=0)
    return embedded.reshape(len(numbers), -1)


def unclip_scheduler(steps: int) -> EulerDiscreteScheduler:
    """Euler over sgm's timesteps: `steps` of the 1000, floor(999 - 999 k / steps) for k = 0..steps-1 (no
    diffusers `timestep_spacing` gives these), then sigma 0."""
    scheduler = EulerDiscreteScheduler(**SCHEDULE)
    scheduler.set_timesteps(timesteps=np.linspace(999, 0, steps, endpoint=False).astype(int).tolist())
    return scheduler


def unclip_start(generators: list[torch.Generator], token_shape: tuple[int, int], sigma: float,
                 latent_size: int = LATENT_SIZE,
                 offset_noise: float = OFFSET_NOISE) -> tuple[torch.Tensor, torch.Tensor]:
    """(start latents [B, 4, S, S], unconditional tokens [B, T, D]) drawn as `utils.unclip_recon` draws them,
    row j from CPU generator j alone: the latent z, the unconditional tokens (N(0, 1): not empty ones),
    the noise and the per-sample offset noise, in that order; the start is z + sigma (noise + offset)."""
    starts, uncond = [], []
    for g in generators:
        z = torch.randn(1, 4, latent_size, latent_size, generator=g)
        uncond.append(torch.randn(1, *token_shape, generator=g))
        noise = torch.randn(z.shape, generator=g)
        offset = torch.randn(1, generator=g)[:, None, None, None]
        starts.append(z + sigma * (noise + offset_noise * offset))
    return torch.cat(starts), torch.cat(uncond)


@torch.no_grad()
def unclip_denoise(unet: UNet2DConditionModel, latents: torch.Tensor, tokens: torch.Tensor, uncond: torch.Tensor,
                   vector: torch.Tensor, scheduler: EulerDiscreteScheduler, guidance: float = 5.0) -> torch.Tensor:
    """sgm's EulerEDMSampler from `latents` at the scheduler's first sigma to sigma 0, with classifier-free
    guidance between `tokens` and `uncond` [B, T, D] under the same vector condition ([1024] or [B, 1024]);
    the latents stay float32 whatever the UNet's dtype."""
    device, dtype = unet.device, unet.dtype
    latents = latents.to(device, torch.float32)
    context = torch.cat([uncond, tokens]).to(device, dtype)
    vector = vector.expand(len(tokens), -1).repeat(2, 1).to(device, dtype)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = unet(x.to(dtype), t, encoder_hidden_states=context, class_labels=vector).sample.float().chunk(2)
        latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    return latents


def unclip_sample(unet: UNet2DConditionModel, tokens: torch.Tensor, vector: torch.Tensor,
                  generators: list[torch.Generator], steps: int = 38, guidance: float = 5.0,
                  latent_size: int = LATENT_SIZE, offset_noise: float = OFFSET_NOISE) -> torch.Tensor:
    """MindEye 2's `unclip_recon` up to the VAE: latents [B, 4, S, S] (divide by the VAE's scaling factor
    to decode) from bigG tokens [B, 256, 1664], one sample per row, row j's randomness from generator j."""
    scheduler = unclip_scheduler(steps)
    start, uncond = unclip_start(generators, tokens.shape[1:], scheduler.sigmas[0].item(), latent_size, offset_noise)
    return unclip_denoise(unet, start, tokens, uncond.to(tokens), vector, scheduler, guidance)


def unclip_images(decoded: torch.Tensor) -> torch.Tensor:
    """The VAE's output -> images in [0, 1] as `unclip_recon` maps it: 0.8 x + 0.2, clamped (not (x + 1) / 2)."""
    return (decoded.float() * 0.8 + 0.2).clamp(0, 1)
