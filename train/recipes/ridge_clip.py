"""The linear baseline for every method: ridge regression from a subject's voxels (all, or one
ROI) to the CLIP target of MindEye's config, fitted in closed form on single trials
(train/closed_form.py) and scored by MindEye's test retrieval (repeat-averaged voxels,
300-way top-1 both ways), so the two tables compare directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from data.subject_data import SubjectData, roi_indices
from models.ridge_decoder import RidgeDecoder
from train.components.clip_targets import ClipConfig, clip_encoder, clip_targets
from train.components.retrieval import RetrievalConfig, retrieval_scores
from train.config import ClosedFormConfig
from train.recipe import Embeds, Fitted, HeldOutScores


@dataclass
class Config(ClosedFormConfig):
    recipe: str = "ridge_clip"
    run_dir: str = "runs/ridge_clip"
    roi: str = "all"  # "all" voxels, or an ROI of the manifest (e.g. "early", "ventral")
    clip: ClipConfig = field(default_factory=ClipConfig)
    eval: RetrievalConfig = field(default_factory=RetrievalConfig)


class Recipe(Fitted, HeldOutScores, Embeds):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = False):
        self.cfg, self.device = cfg, device
        encoder = clip_encoder(cfg.clip).to(device)  # first: a missing file fails before the data is read
        self.data = SubjectData(cfg)
        self.root, self.manifest = self.data.root, self.data.manifest
        self.targets = clip_targets(cfg.clip, self.data, encoder)
        del encoder
        self.model: nn.Module = RidgeDecoder(roi_indices(self.data, cfg.roi, "roi"), self.targets.values.shape[1:])
        self.decoders = {"clip": (self.model, self.targets)}

    @torch.no_grad()
    def embeddings(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """A split's retrieval pairs, on CPU: "brain" (predictions from repeat-averaged voxels),
        "image" (CLIP targets) and "image_ids"."""
        arrays = self.data.split(split)
        voxels, step = arrays.repeat_mean(), self.cfg.eval.batch_size
        brain = torch.cat([forward(voxels[s : s + step].to(self.device)).float().cpu() for s in range(0, len(voxels), step)])
        return {"brain": brain, "image": self.targets[arrays.image_ids], "image_ids": arrays.image_ids}

    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        return retrieval_scores(self.embeddings(forward, split), self.cfg.eval)
