"""A linear decoder from one ROI's voxels to a target (Takagi & Nishimoto's ridge decoders and
the ridge baseline): pick the ROI, standardise with the training trials' statistics, then a
linear map without intercept. The weights come from the closed-form fit in train/ridge.py.
"""
from __future__ import annotations

import torch
from torch import nn


class RidgeDecoder(nn.Module):
    def __init__(self, roi: torch.Tensor, target_shape: tuple[int, ...]):
        """`roi`: indices of the voxels read (int64 [p]); `target_shape`: one sample's target."""
        super().__init__()
        p, t = len(roi), int(torch.tensor(target_shape).prod())
        self.target_shape = tuple(target_shape)
        self.register_buffer("roi", roi.long().clone())
        self.register_buffer("mean", torch.zeros(p))
        self.register_buffer("scale", torch.ones(p))
        self.register_buffer("weight", torch.zeros(p, t))

    def standardize(self, voxels: torch.Tensor) -> torch.Tensor:
        """Voxels [B, V] (all of a subject's) -> the ROI's standardised voxels [B, p]."""
        return (voxels[:, self.roi].to(self.mean) - self.mean) / self.scale

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        return (self.standardize(voxels) @ self.weight).view(len(voxels), *self.target_shape)
