"""Stable Diffusion for Takagi & Nishimoto: the VAE whose latents one ridge decoder predicts,
the CLIP text encoder whose caption embeddings the other predicts, and diffusers'
StableDiffusionImg2ImgPipeline that turns both predictions into images.

data/diffusers_weights.py reads a local diffusers folder (Stable Diffusion v1.4: unet/, vae/,
text_encoder/, tokenizer/, scheduler/) into `img2img_pipeline`, which samples with DDIM on
the folder's noise schedule; `tiny_stable_diffusion` gives a tiny randomly initialised
pipeline (byte-level tokenizer, 2-layer text encoder, 64 px images) for tests and the
simulated dataset.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.image_variation import (
    SD_SCHEDULE,
    decode_latents,
    stimulus_latents,
    tiny_vae,
)

# Stable Diffusion v1's DDIM settings.
SD_DDIM = {**SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer interface over a byte-level vocabulary without merges (one token per character)."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_stable_diffusion(seed: int = 0, sample_size: int = 16, text_width: int = 32) -> StableDiffusionImg2ImgPipeline:
    """A small random pipeline (images of sample_size * 4 pixels) that runs in seconds on a CPU."""
    tokenizer = tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=text_width,
            bos_token_id=special[0], eos_token_id=special[1], pad_token_id=special[1]))
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=8)
    return img2img_pipeline(tiny_vae(sample_size, seed), text.eval(), tokenizer, unet.eval(), DDIMScheduler(**SD_DDIM))


def img2img_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionImg2ImgPipeline:
    """diffusers' img2img pipeline over these parts, without a safety checker or progress bar."""
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def caption_embeddings(pipe: StableDiffusionImg2ImgPipeline, captions: list[list[str]]) -> torch.Tensor:
    """Per image, the text encoder's last hidden states [77, D] averaged over its captions (the
    empty prompt for an image without any): [B, 77, D]."""
    texts = [c if c else [""] for c in captions]
    flat = [t for c in texts for t in c]
    tok = pipe.tokenizer
    ids = tok(flat, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float()
    counts = torch.tensor([len(c) for c in texts], device=hidden.device)
    owner = torch.repeat_interleave(torch.arange(len(texts), device=hidden.device), counts)
    summed = torch.zeros(len(texts), *hidden.shape[1:], device=hidden.device).index_add_(0, owner, hidden)
    return summed / counts[:, None, None]


def vae_latents(pipe: StableDiffusionImg2ImgPipeline, images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> scaled VAE latents (posterior mean) of the images at `size` px."""
    return stimulus_latents(pipe.vae, size, images).float()


@torch.no_grad()
def img2img(pipe: StableDiffusionImg2ImgPipeline, latents: torch.Tensor, embeds: torch.Tensor, uncond: torch.Tensor,
            seeds: list[int], size: int = 512, strength: float = 0.8, steps: int = 50, guidance: float = 5.0,
            n_samples: int = 5) -> torch.Tensor:
    """Predicted latents [B, 4, h, w] and text embeddings [B, 77, D] -> images [B, n_samples, 3, size, size].

    The latents are decoded, resized to `size` and re-encoded by the pipeline, which noises
    them to `strength` of the DDIM schedule and runs the remaining steps with classifier-free
    guidance against `uncond` ([1, 77, D], the empty prompt's embedding). Sample g of image j
    draws its noise from a generator seeded by (seeds[j], g), so results do not depend on how
    images are batched.
    """
    device = pipe.unet.device
    init = F.interpolate(decode_latents(pipe.vae, latents), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)
    generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([s, g]).generate_state(1)[0]))
                  for s in seeds for g in range(n_samples)]
    out = pipe(image=init.repeat_interleave(n_samples, 0).to(device),
               prompt_embeds=embeds.to(device, pipe.unet.dtype).repeat_interleave(n_samples, 0),
               negative_prompt_embeds=uncond.to(device, pipe.unet.dtype).expand(len(generators), -1, -1),
               strength=strength, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
               output_type="pt").images
    return out.float().view(len(latents), n_samples, *out.shape[1:])
