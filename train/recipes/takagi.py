"""Takagi & Nishimoto: two ridge decoders per subject, fitted in closed form on single trials
(train/closed_form.py), then Stable Diffusion img2img.

- `latent`: early visual ROI -> the Stable Diffusion VAE latent of the image at
  `sd.latent_size` px (4 x 40 x 40 at 320 px);
- `text`: ventral ROI -> the CLIP text embedding (77 x 768) averaged over the image's captions.

Targets are computed once by the frozen parts of `sd.weights` and cached. Scored on the test
split (repeat-averaged voxels) by each decoder's two-way identification and mean Pearson r
against the true targets; `python -m train.reconstruct` then decodes the latent, resizes it
to `generation.size`, and runs img2img (strength 0.8: 40 of 50 DDIM steps, guidance 5,
conditioned on the predicted text embedding; 5 samples per image), which `python -m eval
--recons` scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from data.diffusers_weights import load_stable_diffusion
from data.subject_data import SubjectData, roi_indices
from data.targets import cached_targets
from models.ridge_decoder import RidgeDecoder
from models.scores import pearson_matrix, two_way_identification
from models.stable_diffusion import (
    caption_embeddings,
    img2img,
    vae_latents,
)
from train.config import ClosedFormConfig, ConfigError, GenerationKeys
from train.recipe import Fitted, Generates, HeldOutScores


@dataclass
class StableDiffusionConfig:
    weights: str = ""  # local Stable Diffusion v1.4 diffusers folder, or "random"
    seed: int = 0  # initialisation of a random pipeline
    sample_size: int = 16  # latent side of a random pipeline
    latent_size: int = 320  # px at which stimuli are VAE-encoded for the latent target
    batch_size: int = 16  # images per batch when computing targets


@dataclass
class GenerationConfig(GenerationKeys):
    size: int = 512  # px of the decoded latent fed to img2img
    strength: float = 0.8
    steps: int = 50  # DDIM steps of the full schedule (strength x steps are run)
    guidance: float = 5.0
    n_samples: int = 5  # per test image
    batch_size: int = 2  # test images per pipeline call


@dataclass
class Config(ClosedFormConfig):
    recipe: str = "takagi"
    run_dir: str = "runs/takagi"
    latent_roi: str = "early"
    text_roi: str = "ventral"
    sd: StableDiffusionConfig = field(default_factory=StableDiffusionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


class Recipe(Fitted, HeldOutScores, Generates):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = False):
        self.cfg, self.device = cfg, device
        sd = cfg.sd
        if not sd.weights:
            raise ConfigError("sd.weights is not set: give a local Stable Diffusion v1.4 diffusers folder, or 'random'")
        self.pipe = load_stable_diffusion(sd.weights, "sd.weights", sd.seed, sd.sample_size).to(device)  # fails fast
        self.data = SubjectData(cfg)
        self.root, self.manifest = self.data.root, self.data.manifest
        source = {"weights": sd.weights, **({"seed": sd.seed, "sample_size": sd.sample_size} if sd.weights == "random" else {})}
        d = self.data
        latents = cached_targets(lambda images: vae_latents(self.pipe, images.to(device), sd.latent_size),
                                 {"kind": "sd_vae_latent", "size": sd.latent_size, **source}, d.root, d.manifest,
                                 d.subject, d.cache, sd.batch_size, "VAE latents")
        texts = cached_targets(lambda images, captions: caption_embeddings(self.pipe, captions),
                               {"kind": "sd_text_embedding", **source}, d.root, d.manifest, d.subject, d.cache,
                               sd.batch_size, "caption embeddings", with_captions=True)
        self.model = nn.ModuleDict({
            "latent": RidgeDecoder(roi_indices(d, cfg.latent_roi, "latent_roi"), latents.values.shape[1:]),
            "text": RidgeDecoder(roi_indices(d, cfg.text_roi, "text_roi"), texts.values.shape[1:]),
        })
        self.decoders = {"latent": (self.model["latent"], latents), "text": (self.model["text"], texts)}
        self.uncond = caption_embeddings(self.pipe, [[""]])  # the empty prompt: guidance's unconditional pass

    @torch.no_grad()
    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Per decoder, on repeat-averaged voxels: two-way identification (%) of the predicted
        targets among the split's true ones, and the mean Pearson r of each prediction with
        its own target."""
        arrays = self.data.split(split)
        voxels = arrays.repeat_mean().to(self.device)
        out: dict[str, float] = {}
        for name, (_, targets) in self.decoders.items():
            predicted, truth = forward[name](voxels).float().cpu(), targets[arrays.image_ids]
            out[f"{name}_two_way"] = two_way_identification(truth, predicted)
            out[f"{name}_r"] = pearson_matrix(truth, predicted).diagonal().mean().item()
        return out

    @torch.no_grad()
    def generate(self, voxels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Repeat-averaged voxels [B, V] -> images [B, n_samples, 3, size, size] in [0, 1]."""
        g = self.cfg.generation
        v = voxels.to(self.device)
        return img2img(self.pipe, self.model["latent"](v), self.model["text"](v), self.uncond, seeds, g.size,
                       g.strength, g.steps, g.guidance, g.n_samples)
