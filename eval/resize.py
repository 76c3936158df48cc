"""Resizing images before a metric, in the published tables' convention or with antialiasing.

"reference" (the default) is what the metric code behind the MindEye 1 and 2 tables did: it
resized float tensors with torchvision's `transforms.Resize` (torchvision 0.15 and 0.16), whose
default then applied no antialiasing to tensors, so shrinking an image samples it at 2 x 2
points per output pixel (bilinear) and aliases fine detail. "antialias" low-pass filters
when shrinking, as PIL does. Enlarging gives the same result under both. The choice moves
the low-level scores (PixCorr, SSIM) of images that are shrunk, e.g. 512 px
reconstructions brought to 256 px.

`resize_like_pil` is the third convention, that of a reference that resized 8-bit PIL
images (MinD-Vis' ViT-H/14 classifier through its weights' `transforms()`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE_CONVENTIONS = ("reference", "antialias")


def resize(images: torch.Tensor, size: int, interpolation: str = "bilinear", convention: str = "reference") -> torch.Tensor:
    """Float images [..., C, H, W] -> [..., C, size, size] (align_corners=False); antialiased
    only under the "antialias" convention."""
    if convention not in RESIZE_CONVENTIONS:
        raise ValueError(f"unknown resize convention {convention!r}; known: {', '.join(RESIZE_CONVENTIONS)}")
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:]).float()
    out = F.interpolate(flat, size=(size, size), mode=interpolation, align_corners=False,
                        antialias=convention == "antialias")
    return out.view(*lead, *out.shape[-3:])


def resize_like_pil(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images [B, C, H, W] in [0, 1] -> [B, C, size, size] in [0, 1], resized as PIL's
    bicubic resize of the 8-bit image: values rounded to 8 bits, Keys' cubic with a = -0.5
    widened when shrinking, the width first and then the height, each pass rounded to 8 bits
    and clipped. Agrees with PIL to within 1/255 (PIL's fixed-point weights round a few
    values in 10,000 the other way)."""
    x = (images.float() * 255).round()
    for out_size in ((x.shape[-2], size), (size, size)):
        x = F.interpolate(x, size=out_size, mode="bicubic", align_corners=False, antialias=True)
        x = (x + 0.5).floor().clamp(0, 255)
    return x / 255
