"""The training forward pass the memory planner counts for the MindEye recipes: synthetic
voxels of the real shapes through the model, then the losses as the recipes compute them on
every rank: the contrastive loss over the projected tokens gathered from all ranks, the
prior's MSE at a noise draw for the global batch. Built to run on the meta device."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion_prior import PriorDiffusion
from train.losses import soft_clip


def gathered(x: torch.Tensor, ranks: int) -> torch.Tensor:
    """What `train.distributed.gather` allocates on one rank: a part per rank, concatenated."""
    return torch.cat([x, *(torch.zeros_like(x) for _ in range(ranks - 1))])


def clip_prior_forward(model: nn.Module, diffusion: PriorDiffusion | None, n_tokens: int, dim: int,
                       run: Callable[[int, dict], tuple], micro_batch: int, ranks: int) -> tuple[torch.Tensor, tuple]:
    """`run(micro_batch, prior_inputs)` calls the model on synthetic voxels and returns its
    outputs (tokens, projected tokens, ..., and last the prior's prediction when it has one);
    returns (loss, outputs)."""
    p = next(model.parameters())
    target = torch.zeros(micro_batch * ranks, n_tokens, dim, device=p.device)
    inputs, x0 = {}, None
    if diffusion is not None:  # drawn for the global batch, this rank's slice kept
        draw = diffusion.noise(target)
        x0 = draw.pop("x0")[:micro_batch]
        inputs = {k: (v.to(p.dtype) if v.is_floating_point() else v)[:micro_batch] for k, v in draw.items()}
    out = run(micro_batch, inputs)
    loss = soft_clip(gathered(out[1].float(), ranks), target, 0.01)
    if x0 is not None:
        loss = loss + F.mse_loss(out[-1].float(), x0)
    return loss, out
