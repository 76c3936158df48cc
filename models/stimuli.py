"""The stimulus images as models take them: uint8 [B, H, W, 3] -> float [B, 3, size, size] in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_stimuli(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, size, size] in [0, 1] (bicubic, antialiased)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
