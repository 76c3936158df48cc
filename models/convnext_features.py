"""A frozen ConvNeXt whose intermediate feature map is the low-level branch's contrastive teacher.

The map after stage `stage` (1-4; stage 2 has stride 8) is average-pooled to the student's
s x s grid and returned as per-position features [B, s * s, C]. Architectures are built
with torchvision's ConvNeXt: "convnext_large", "convnext_xlarge" (dims 256-2048, as
MindEye 1 used), or "tiny" sizes from the config (tests, embedded default, random weights).
Real runs load a torchvision-layout state dict, which data/pretrained_weights.py reads from
a local file (`teacher.weights`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from models.strict_load import StateMismatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = {"convnext_large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
         "convnext_xlarge": ((256, 512, 1024, 2048), (3, 3, 27, 3))}


def _convnext(dims, depths) -> ConvNeXt:
    blocks = [CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n) for i, (d, n) in enumerate(zip(dims, depths))]
    return ConvNeXt(blocks, stochastic_depth_prob=0.0)


class ConvNeXtFeatures(nn.Module):
    def __init__(self, net: ConvNeXt, stage: int, channels: int, image_size: int, grid: int):
        super().__init__()
        self.channels = channels
        # features = [stem, stage 1, down, stage 2, down, stage 3, down, stage 4]: keep up to `stage`.
        self.features = net.features[: 2 * stage].eval().requires_grad_(False)
        self.image_size, self.grid = image_size, grid
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float images [B, 3, H, W] in [0, 1] -> features [B, grid * grid, C]."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        x = self.features((x - self.mean) / self.std)
        return F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)


def build_convnext_features(arch: str, state: dict | None, stage: int, image_size: int, grid: int, seed: int = 0,
                            tiny: dict | None = None) -> ConvNeXtFeatures:
    """`state` is a torchvision-layout state dict (its `features.*` entries are loaded), or None
    for random weights from `seed` (tests, embedded default). A state that does not fit `arch`
    raises StateMismatch."""
    if arch == "tiny":
        if not tiny:
            raise ValueError("teacher.arch=tiny needs teacher.tiny sizes (dims, depths)")
        dims, depths = tiny["dims"], tiny["depths"]
    elif arch in ARCHS:
        dims, depths = ARCHS[arch]
    else:
        raise ValueError(f"teacher.arch: {arch!r}, expected one of {sorted(ARCHS)} or 'tiny'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _convnext(dims, depths)
    if not 1 <= stage <= len(dims):
        raise ValueError(f"teacher.stage: {stage}, expected 1..{len(dims)}")
    if state is not None:
        kept = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = [k for k in net.features.state_dict() if f"features.{k}" not in kept]
        if missing:
            raise StateMismatch(f"not a torchvision {arch} state dict (missing features.{missing[0]})")
        net.features.load_state_dict({k.removeprefix("features."): v for k, v in kept.items()})
    return ConvNeXtFeatures(net, stage, dims[stage - 1], image_size, grid)
