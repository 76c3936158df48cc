"""Masked brain modeling on unlabelled fMRI: MinD-Vis pretraining, and DC-MAE phase 1.

Every sample of the pretraining subjects' train splits is one unlabelled voxel vector (one
repeat drawn per epoch), wrap-padded or truncated to the encoder's voxel count
(`models.mbm.voxel_fit`). Each step masks every sample twice when cross-contrast is on
(the batch is duplicated: masks are drawn per row) and once otherwise; the loss is

    loss.recon x masked-patch MSE (mean over the maskings)
    + loss.self_contrast x InfoNCE(reconstruction of the first masking, the sample)
    + loss.cross_contrast x InfoNCE(reconstructions of the two maskings),

InfoNCE on cosine similarity / loss.temperature with the rest of the global batch as
negatives. MinD-Vis is the first term alone; DC-MAE turns on the other two.

Scored on held-out subjects that are never trained on (repeat-averaged voxels, masks drawn
from a fixed seed): masked-patch MSE, the MSE of predicting zeros for the same voxels,
Pearson r of the masked voxels, and the mean cosine similarity between reconstructions of
two maskings of the same sample and of different samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from data.subject_data import SubjectData
from models.mbm import fit_voxels, voxel_fit
from train import distributed
from train.components.mbm_encoder import ModelConfig, build_encoder
from train.components.precision import engine_dtype
from train.config import ConfigError, DataConfig, RunConfig
from train.losses import info_nce
from train.recipe import HeldOutScores, Trained


@dataclass
class PretrainDataConfig(DataConfig):
    subjects: list[int] = field(default_factory=list)  # pretraining subjects; empty: every subject not held out
    heldout_subjects: list[int] = field(default_factory=list)  # scored, never trained on; empty: score the
    # pretraining subjects' own val/test splits


@dataclass
class LossConfig:
    recon: float = 1.0
    self_contrast: float = 0.0  # DC-MAE
    cross_contrast: float = 0.0  # DC-MAE
    temperature: float = 0.1


@dataclass
class EvalConfig:
    batch_size: int = 256


@dataclass
class Config(RunConfig):
    recipe: str = "mbm"
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class Recipe(Trained, HeldOutScores):
    Config = Config

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True):
        self.cfg, self.device = cfg, device
        d = cfg.data
        every = SubjectData(cfg, []).subjects
        heldout = list(d.heldout_subjects)
        for s in heldout:
            if s in d.subjects:
                raise ConfigError(f"data.heldout_subjects: subject {s} is also in data.subjects")
        subjects = list(d.subjects) or [s for s in every if s not in heldout]
        if not subjects:
            raise ConfigError("data.heldout_subjects: every subject is held out; none is left to pretrain on")
        self.data = SubjectData(cfg, subjects)
        self.scored = SubjectData(cfg, heldout) if heldout else self.data
        self.root, self.manifest, self.subjects = self.data.root, self.data.manifest, self.data.subjects
        if cfg.model.n_voxels == 0:
            cfg.model.n_voxels = self.data.n_voxels
        self.n_voxels = cfg.model.n_voxels
        self.model = build_encoder(cfg.model)
        if train:
            self.loader = self.data.loader(rank, world, self.fit)

    def fit(self, voxels: torch.Tensor) -> torch.Tensor:
        return fit_voxels(voxels, self.n_voxels)

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.cfg.loss
        x = batch["voxels"].to(self.device, engine_dtype(engine))
        n_views = 2 if w.cross_contrast else 1
        recon, pred, _ = engine(x.repeat(n_views, 1))  # each row draws its own mask
        views = pred.float().flatten(1).chunk(n_views)
        parts = {"recon": recon}
        if w.self_contrast:
            target = self.model.patchify(x).float().flatten(1)
            parts["self_contrast"] = info_nce(distributed.gather(views[0], with_grad=True), distributed.gather(target),
                                              w.temperature)
        if w.cross_contrast:
            a, b = (distributed.gather(v, with_grad=True) for v in views)
            parts["cross_contrast"] = info_nce(a, b, w.temperature)
        loss = sum(w[k] * v for k, v in parts.items())
        return loss, {k: distributed.mean(v.detach()).item() for k, v in {"loss": loss, **parts}.items()}

    @torch.no_grad()
    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Masked reconstruction of the scored subjects' split, averaged over subjects."""
        totals: dict[str, float] = {}
        for s in self.scored.subjects:
            for k, v in self._score_subject(forward, self.scored.split(split, s).repeat_mean(), dtype).items():
                totals[k] = totals.get(k, 0.0) + v / len(self.scored.subjects)
        counts = {self.manifest["subjects"][str(s)]["n_voxels"] for s in self.scored.subjects}
        fits = sorted({voxel_fit(c, self.n_voxels) for c in counts})
        return {**totals, "n_subjects": len(self.scored.subjects), "voxel_fit": ",".join(fits)}

    def _score_subject(self, forward, voxels: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
        g = torch.Generator().manual_seed(self.cfg.seed)
        err = zero = same = other = 0.0
        preds, truths = [], []
        step = self.cfg.eval.batch_size
        for i in range(0, len(voxels), step):
            x = self.fit(voxels[i : i + step]).to(self.device)
            n = len(x)
            _, pred, mask = forward(x.repeat(2, 1).to(dtype), generator=g)
            pred, mask, target = pred.float(), mask.bool(), self.model.patchify(x).float()
            first = mask[:n]
            err += (pred[:n] - target).square().mean(-1)[first].sum().item()
            zero += target.square().mean(-1)[first].sum().item()
            preds.append(pred[:n][first].flatten())
            truths.append(target[first].flatten())
            a, b = (F.normalize(v.flatten(1), dim=-1) for v in pred.chunk(2))
            sim = a @ b.T
            same += sim.diagonal().sum().item()
            other += (sim.sum() - sim.diagonal().sum()).item() / max(1, n - 1)
        n_masked = torch.cat(preds).numel() / self.model.patch_size
        r = torch.corrcoef(torch.stack((torch.cat(preds), torch.cat(truths))))[0, 1].item()
        return {"masked_mse": err / n_masked, "zero_mse": zero / n_masked, "masked_r": r,
                "views_same_cos": same / len(voxels), "views_other_cos": other / len(voxels)}
