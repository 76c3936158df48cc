"""A frozen open_clip image encoder that turns stimuli into MindEye's CLIP targets.

Two target kinds:
- "tokens": every hidden token after the final layer norm, through the visual
  projection, each divided by the CLS token's norm ([B, 1 + n_patches, embed_dim];
  257 x 768 for ViT-L/14 as in MindEye 1);
- "pooled": the usual L2-free image embedding ([B, 1, embed_dim]).

Real runs load pretrained weights from a local file (`clip.weights`). A randomly
initialised encoder is built only when the config says `weights: random`, which the
embedded default does with a small architecture and a fixed seed.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1] -> normalised [B, 3, S, S].

    Bicubic (antialiased) resize of the shortest side to `image_size`, centre crop, then
    (x - mean) / std with mean, std of shape [1, 3, 1, 1].
    """
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float() / 255.0
    h, w = images.shape[-2:]
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    images = images[..., top : top + image_size, left : left + image_size]
    return (images - mean) / std


def load_open_clip(arch: str, weights: str) -> open_clip.CLIP:
    """The open_clip model `arch` with weights from the local checkpoint file `weights`."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP weights not found (set clip.weights to a local open_clip checkpoint for {arch})")
    return open_clip.create_model(arch, pretrained=str(path))


class FrozenCLIPImage(nn.Module):
    def __init__(self, visual: VisionTransformer, image_size: int, target: str = "tokens"):
        super().__init__()
        if target not in ("tokens", "pooled"):
            raise ValueError(f"clip.target: {target!r}, expected 'tokens' or 'pooled'")
        self.visual, self.image_size, self.target = visual.eval().requires_grad_(False), image_size, target
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def target_shape(self) -> tuple[int, int]:
        dim = self.visual.output_dim
        return (self.visual.grid_size[0] * self.visual.grid_size[1] + 1, dim) if self.target == "tokens" else (1, dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.target == "pooled":
            return self.visual(x).unsqueeze(1)
        v = self.visual
        tokens = v.ln_post(v.transformer(v._embeds(x))) @ v.proj
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)


def target_shape(arch: str, target: str, tiny: dict | None = None) -> tuple[int, int]:
    """(tokens, dim) of the targets `build_clip_image(arch, ..., target, tiny=tiny)` gives,
    from the architecture's config alone (no weights, no model)."""
    if tiny:
        size, patch, dim = tiny["image_size"], tiny["patch_size"], tiny["output_dim"]
    else:
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(f"clip.arch: {arch!r} is not an open_clip architecture")
        vision = config["vision_cfg"]
        size, patch, dim = vision["image_size"], vision["patch_size"], config["embed_dim"]
    return ((size // patch) ** 2 + 1, dim) if target == "tokens" else (1, dim)


def build_clip_image(arch: str, weights: str, target: str, seed: int = 0, tiny: dict | None = None) -> FrozenCLIPImage:
    """`weights` is a local checkpoint path, or "random" (only for tests and the embedded default).

    For "random", `tiny` gives the VisionTransformer sizes (image_size, patch_size, width,
    layers, heads, output_dim); the encoder is initialised from `seed`.
    """
    if weights == "random":
        if not tiny:
            raise ValueError("clip.weights=random needs clip.tiny sizes (image_size, patch_size, width, layers, heads, output_dim)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            visual = VisionTransformer(mlp_ratio=4.0, **tiny)
        return FrozenCLIPImage(visual, tiny["image_size"], target)
    model = load_open_clip(arch, weights)
    return FrozenCLIPImage(model.visual, model.visual.image_size[0], target)
