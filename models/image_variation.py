"""MindEye 1's generation stage: images from brain-predicted CLIP image tokens.

The diffusion prior predicts CLIP ViT-L/14 image tokens [B, 257, 768]; here they are the
cross-attention context of a latent-diffusion UNet, exactly where Versatile Diffusion's
image-variation UNet reads the CLIP tokens of a real image. As in MindEye 1, generation can
start from the low-level branch's VAE latent (img2img at strength 0.85) instead of pure
noise, so that layout and colour come from the blurry reconstruction and semantics from the
tokens. Several samples are drawn per brain embedding; picking the best of them (MindEye 1
ranks them by CLIP similarity to the predicted embedding) is the caller's job.

data/diffusers_weights.py reads the pipeline from a local diffusers folder; here,
`tiny_image_variation` gives a tiny, randomly initialised one for tests and the simulated
dataset, which have no pretrained generator.
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    VQModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from models.stimuli import resize_stimuli

# Stable Diffusion's noise schedule, which Versatile Diffusion shares.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "prediction_type": "epsilon"}


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents [N, C, h, w] -> float images [N, 3, H, W] in [0, 1]."""
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return ((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_images(vae: AutoencoderKL | VQModel, images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] -> scaled latents: a KL VAE's posterior mean (so deterministic),
    a VQ autoencoder's unquantised latents (as CompVis' `encode_first_stage`; decoding quantises)."""
    images = images.to(vae.device, vae.dtype) * 2 - 1
    encoded = vae.encode(images)
    latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
    return latents * vae.config.scaling_factor


def stimulus_latents(vae: AutoencoderKL, size: int, images: torch.Tensor) -> torch.Tensor:
    """uint8 stimuli [B, H, W, 3] -> scaled VAE latents (posterior mean) of the images at `size` px."""
    return encode_images(vae, resize_stimuli(images, size))


class BrainImageVariation(DiffusionPipeline):
    """Latent diffusion conditioned, through cross-attention, on CLIP image tokens [B, T, D]."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: SchedulerMixin | None = None):
        super().__init__()
        if scheduler is None:
            scheduler = UniPCMultistepScheduler(**SD_SCHEDULE)
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vae, images)

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor, uncond: torch.Tensor, steps: int = 20, guidance: float = 3.5,
                 init_latents: torch.Tensor | None = None, strength: float = 0.85, n_samples: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """embeds [B, T, D] -> images [B, n_samples, 3, H, W] in [0, 1].

        `uncond` ([1, T, D] or [B, T, D]) is the context of the unconditional pass of
        classifier-free guidance; guidance 1 skips that pass. With `init_latents` (scaled VAE
        latents [B, C, h, w]) the run is img2img: the latents are noised to the timestep at
        fraction `strength` of the schedule and only the remaining steps are run; strength 1
        ignores them and starts from pure noise, as MindEye 1 does.
        """
        device, dtype = self.unet.device, self.unet.dtype
        b, dim = len(embeds), self.unet.config.cross_attention_dim
        if embeds.ndim != 3 or embeds.shape[-1] != dim:
            raise ValueError(f"embeds must be [B, T, {dim}], got {list(embeds.shape)}")
        if uncond.ndim != 3 or len(uncond) not in (1, b) or uncond.shape[1:] != embeds.shape[1:]:
            raise ValueError(f"uncond must be [1 or {b}, {embeds.shape[1]}, {dim}], got {list(uncond.shape)}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        channels, side = self.unet.config.in_channels, self.unet.config.sample_size
        shape = (b * n_samples, channels, side, side)
        if init_latents is not None and tuple(init_latents.shape) != (b, *shape[1:]):
            raise ValueError(f"init_latents must be {[b, *shape[1:]]}, got {list(init_latents.shape)}")

        # Sample i of embedding j sits at row j * n_samples + i throughout.
        cond = embeds.to(device, dtype).repeat_interleave(n_samples, 0)
        if guidance != 1:
            null = uncond.to(device, dtype).expand(b, -1, -1).repeat_interleave(n_samples, 0)
            cond = torch.cat([null, cond])

        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        if init_latents is None or strength == 1:
            latents = noise * scheduler.init_noise_sigma
        else:
            n_run = min(int(steps * strength), steps)
            if n_run < 1:
                raise ValueError(f"strength {strength} of {steps} steps leaves no step to run")
            start = (steps - n_run) * scheduler.order
            timesteps = timesteps[start:]
            # Set before add_noise, so that both it and the first step use the sigma at `start`.
            scheduler.set_begin_index(start)
            init = init_latents.to(device, dtype).repeat_interleave(n_samples, 0)
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(init)))

        for t in timesteps:
            x = scheduler.scale_model_input(latents, t)
            if guidance != 1:
                x = torch.cat([x, x])
            eps = self.unet(x, t, encoder_hidden_states=cond).sample
            if guidance != 1:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample

        images = self.decode(latents)
        return images.view(b, n_samples, *images.shape[1:])


def tiny_vae(sample_size: int = 16, seed: int = 0) -> AutoencoderKL:
    """A small random KL VAE (scale factor 4), seeded on its own so that the generator and
    the low-level branch, built separately, share it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=sample_size * 4, scaling_factor=0.18215)
    return vae.eval()


def tiny_image_variation(cross_attention_dim: int, sample_size: int = 16, seed: int = 0) -> BrainImageVariation:
    """A small random pipeline (images of sample_size * 4 pixels) that runs in seconds on a CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)
    return BrainImageVariation(unet.eval(), tiny_vae(sample_size, seed), UniPCMultistepScheduler(**SD_SCHEDULE))

