"""MinD-Vis stage B: a latent diffusion UNet conditioned on a pretrained fMRI masked autoencoder.

Two conditionings (`CONDITIONINGS`) map the encoder's tokens to the UNet's cross-attention
context and to a term added to its time embedding:

- "mind_vis", MinD-Vis' own (`MindVisConditioning`, its `cond_stage_model` and the UNet's
  `time_embed_condtion`): the encoder's patch tokens [B, n_patches, D] without the class token
  (its stage-B `fmri_encoder`) -> Conv1d(n_patches, n_patches // 2, 1) -> Conv1d(.., 77, 1) ->
  Linear(D, context_dim) = context; context -> Conv1d(77, 38, 1) -> Conv1d(38, 1, 1) ->
  Linear(context_dim, time_embed_dim), added to the time embedding after its MLP (diffusers'
  `class_embed_type="identity"`).
- "pooled", this project's lighter variant (`PooledConditioning`): the class token and the patch
  tokens -> one Conv1d(1 + n_patches, 77, 1) -> Linear(D, context_dim) = context; its token mean
  through diffusers' `class_embed_type="projection"` (Linear-SiLU-Linear) is the time term.

Trained (`set_trainable`): the fMRI encoder, the conditioning, the UNet's class embedding and in
every transformer block of the UNet the cross-attention `attn2` and its norm `norm2`. The
autoencoder (a KL VAE or MinD-Vis' VQ-f4) is not part of the module: latents are cached by the
recipe and decoded at sampling.

Plain modules and samplers; data/diffusers_weights.py and data/compvis_ldm.py read pretrained
weights, and the training loop lives in train/recipes/fmri_ldm.py.
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from models.image_variation import decode_latents
from models.mbm import MaskedBrainModel, fit_voxels, strip_decoder, voxel_fit

N_CONTEXT = 77  # context tokens, as the text encoders the LDM UNets were built for
SAMPLERS = ("plms", "ddim")


class PooledConditioning(nn.Module):
    """Encoder tokens with the class token [B, 1 + n_patches, D] -> (context [B, n_context, context_dim],
    pooled context [B, context_dim] for the UNet's projection class embedding)."""

    uses_class_token, class_embed_type = True, "projection"

    def __init__(self, n_patches: int, dim: int, context_dim: int, time_embed_dim: int, n_context: int = N_CONTEXT):
        super().__init__()
        self.token_map = nn.Conv1d(1 + n_patches, n_context, kernel_size=1)
        self.proj = nn.Linear(dim, context_dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.proj(self.token_map(tokens))
        return context, context.mean(1)


class MindVisConditioning(nn.Module):
    """Patch tokens [B, n_patches, D] -> (context [B, n_context, context_dim], the time-embedding
    term [B, time_embed_dim]), as MinD-Vis' `cond_stage_model` and `time_embed_condtion`."""

    uses_class_token, class_embed_type = False, "identity"

    def __init__(self, n_patches: int, dim: int, context_dim: int, time_embed_dim: int, n_context: int = N_CONTEXT):
        super().__init__()
        self.channel_mapper = nn.Sequential(nn.Conv1d(n_patches, n_patches // 2, 1),
                                            nn.Conv1d(n_patches // 2, n_context, 1))
        self.dim_mapper = nn.Linear(dim, context_dim)
        self.time = nn.Sequential(nn.Conv1d(n_context, n_context // 2, 1), nn.Conv1d(n_context // 2, 1, 1),
                                  nn.Linear(context_dim, time_embed_dim))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.dim_mapper(self.channel_mapper(tokens))
        return context, self.time(context).squeeze(1)


CONDITIONINGS = {"pooled": PooledConditioning, "mind_vis": MindVisConditioning}


class FMRILDM(nn.Module):
    """fMRI encoder + conditioning + UNet; forward gives the UNet's noise prediction."""

    def __init__(self, encoder: MaskedBrainModel, unet: UNet2DConditionModel, n_context: int = N_CONTEXT,
                 conditioning: str = "pooled"):
        super().__init__()
        c = unet.config
        kind = CONDITIONINGS[conditioning]
        if c.class_embed_type != kind.class_embed_type or (
                kind is PooledConditioning and c.projection_class_embeddings_input_dim != c.cross_attention_dim):
            raise ValueError(f"the {conditioning} conditioning needs a UNet with " + ", ".join(
                f"{k}={v!r}" for k, v in class_embedding(conditioning, c.cross_attention_dim).items()))
        self.encoder, self.unet = strip_decoder(encoder), unet
        self.conditioning = kind(encoder.n_patches, encoder.patch_embed.out_channels, c.cross_attention_dim,
                                 unet.time_embedding.linear_2.out_features, n_context)

    @property
    def n_voxels(self) -> int:
        return self.encoder.n_voxels

    def voxel_fit(self, n_data: int) -> str:
        return voxel_fit(n_data, self.n_voxels)

    def condition(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxels [B, V] of any count (wrap-padded or truncated to the encoder's) -> (context, pooled)."""
        voxels = fit_voxels(voxels, self.n_voxels)
        tokens = (self.encoder.encode(voxels, mask_ratio=0.0)[0] if self.conditioning.uses_class_token
                  else self.encoder.patch_tokens(voxels))
        return self.conditioning(tokens)

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                time_term: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, timesteps, encoder_hidden_states=context, class_labels=time_term).sample

    def forward(self, voxels: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        context, pooled = self.condition(voxels)
        return self.denoise(latents, timesteps, context, pooled)


def set_trainable(model: FMRILDM) -> None:
    """requires_grad on the encoder, the conditioning, the UNet's class embedding and the
    cross-attention (`attn2`) and its norm (`norm2`) of every UNet transformer block; off elsewhere."""
    model.requires_grad_(False)
    for part in (model.encoder, model.conditioning, model.unet.class_embedding):
        part.requires_grad_(True)
    for block in model.unet.modules():
        if isinstance(block, BasicTransformerBlock) and block.attn2 is not None:
            block.attn2.requires_grad_(True)
            block.norm2.requires_grad_(True)


# ---------------------------------------------------------------------------- building and sampling


def class_embedding(conditioning: str, context_dim: int) -> dict:
    """The UNet config entries through which a conditioning's time term enters."""
    if conditioning == "pooled":
        return {"class_embed_type": "projection", "projection_class_embeddings_input_dim": context_dim}
    return {"class_embed_type": "identity"}


def tiny_unet(context_dim: int, sample_size: int = 8, in_channels: int = 4, seed: int = 0,
              conditioning: str = "pooled") -> UNet2DConditionModel:
    """A small random UNet (with the class embedding of `conditioning`) that runs in seconds on a CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context_dim, attention_head_dim=8,
            norm_num_groups=8, **class_embedding(conditioning, context_dim))


def sampler(name: str, schedule: dict):
    """A fresh sampler on the training schedule: "plms" (PNDM without Runge-Kutta steps) or "ddim"."""
    if name == "plms":
        return PNDMScheduler.from_config(schedule, skip_prk_steps=True)
    if name == "ddim":
        return DDIMScheduler.from_config(schedule)
    raise ValueError(f"generation.scheduler: {name!r}, expected one of {', '.join(SAMPLERS)}")


def vae_factor(vae: AutoencoderKL | VQModel) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae: AutoencoderKL | VQModel) -> int:
    """The channels of the latents the diffusion model sees (a VQ autoencoder's codebook width)."""
    return getattr(vae.config, "vq_embed_dim", None) or vae.config.latent_channels


@torch.no_grad()
def sample(model: FMRILDM, vae: AutoencoderKL | VQModel, scheduler, voxels: torch.Tensor, latent_shape: tuple[int, int, int],
           steps: int, n_samples: int, generators: list[torch.Generator]) -> torch.Tensor:
    """voxels [B, V] -> images [B, n_samples, 3, H, W] in [0, 1]. Sample i of scan j starts
    from noise drawn from generators[j], so a scan's images do not depend on its batch."""
    device, dtype = next(model.unet.parameters()).device, next(model.unet.parameters()).dtype
    b = len(voxels)
    context, time_term = model.condition(voxels.to(device, dtype))
    context, time_term = context.repeat_interleave(n_samples, 0), time_term.repeat_interleave(n_samples, 0)
    noise = torch.stack([torch.randn((n_samples, *latent_shape), generator=g) for g in generators])
    scheduler.set_timesteps(steps, device=device)
    latents = noise.flatten(0, 1).to(device, dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model.denoise(scheduler.scale_model_input(latents, t), t, context, time_term)
        latents = scheduler.step(eps, t, latents).prev_sample
    images = decode_latents(vae, latents)
    return images.view(b, n_samples, *images.shape[1:])
