"""A frozen CLIP image encoder (open_clip's ViT) that turns stimuli into MindEye's CLIP targets.

Three target kinds. Two exactly as MindEye 1 computed them (its `Clipper.embed_image` with
`norm_embs`), on images preprocessed as it did (`clip_preprocess`):
- "tokens": every hidden token after the final layer norm, through the visual projection,
  each divided by the CLS token's norm ([B, 1 + n_patches, embed_dim]; 257 x 768 for
  ViT-L/14);
- "pooled": the image embedding, L2-normalised ([B, 1, embed_dim]).
One exactly as MindEye 2 computed them (sgm's `FrozenOpenCLIPImageEmbedder` with
`only_tokens`, open_clip 2.24), on images preprocessed as it did (`sgm_preprocess`):
- "patch_tokens": the patch tokens after the final layer norm, without the CLS token and
  without the projection ([B, n_patches, width]; 256 x 1664 for ViT-bigG/14). The activation is part of the
weights: OpenAI's CLIP, MindEye 1's, was trained with QuickGELU, open_clip's own trainings
with GELU; the wrong one still runs but gives other targets. Weights come in as a state dict in
OpenAI's layout (models/clip_keys.py; data/clip_weights.py reads the files); without one the
encoder is random, which only tests and the embedded default ask for.
"""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from models.strict_load import load_strict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TARGETS = ("tokens", "pooled", "patch_tokens")


def clip_preprocess(images: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor,
                    antialias: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1] -> normalised [B, 3, S, S].

    The shortest side resized to `image_size` (bicubic), a centre crop, then (x - mean) / std
    with mean, std of shape [1, 3, 1, 1]. By default this is MindEye 1's `Resize(S, BICUBIC)`,
    `CenterCrop(S)`, `Normalize` of torchvision 0.15 on float tensors: no antialiasing and no
    clamping (values overshoot [0, 1] near edges), the long side truncated to an integer and
    the crop offset rounded half to even, as torchvision does. `antialias=True` filters when
    shrinking and clamps to [0, 1], as a resize of 8-bit PIL images does.
    """
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float() / 255.0
    h, w = images.shape[-2:]
    long = int(image_size * max(h, w) / min(h, w))
    size = (image_size, long) if h <= w else (long, image_size)
    if size != (h, w):
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=antialias)
        if antialias:
            images = images.clamp(0, 1)
    top, left = (int(round((n - image_size) / 2.0)) for n in size)
    images = images[..., top : top + image_size, left : left + image_size]
    return (images - mean) / std


def _gaussian_taps(sigma: float) -> torch.Tensor:
    size = int(max(4 * sigma, 3))
    size += 1 - size % 2  # odd
    x = torch.arange(size, dtype=torch.float32) - size // 2
    taps = torch.exp(-x.square() / (2 * sigma * sigma))
    return taps / taps.sum()


def sgm_preprocess(images: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> the input MindEye 2's CLIP targets were computed from.

    As kornia 0.7's `resize(..., bicubic, align_corners=True, antialias=True)`: an image of
    the target size passes unchanged; when shrinking, a separable Gaussian blur first (sigma
    (factor - 1) / 2 per axis, at least 0.001; reflect padding), then bicubic interpolation with
    aligned corners. Then (x + 1) / 2, meant for images in [-1, 1] but applied by MindEye 2 to
    images in [0, 1] (the network sees [0.5, 1]), and (x - mean) / std.
    """
    h, w = images.shape[-2:]
    if (h, w) != (image_size, image_size):
        factors = (h / image_size, w / image_size)
        if max(factors) > 1:
            ty, tx = (_gaussian_taps(max((f - 1) / 2, 0.001)).to(images) for f in factors)
            c = images.shape[1]
            pad = (len(tx) // 2, len(tx) // 2, len(ty) // 2, len(ty) // 2)
            images = F.pad(images, pad, mode="reflect")
            images = F.conv2d(images, tx.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
            images = F.conv2d(images, ty.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        images = F.interpolate(images, size=(image_size, image_size), mode="bicubic", align_corners=True)
    return ((images + 1) / 2 - mean) / std


def create_open_clip(arch: str, quick_gelu: bool) -> open_clip.CLIP:
    """The open_clip model `arch`, randomly initialised, with QuickGELU or GELU. Only CLIPs of
    OpenAI's layout (an image tower and a text transformer, as `open_clip.CLIP`) are built."""
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"clip.arch: {arch!r} is not an open_clip architecture")
    if not set(config) <= {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}:
        raise ValueError(f"clip.arch: {arch} is not a CLIP of OpenAI's layout")
    if config.get("quick_gelu") and not quick_gelu:
        raise ValueError(f"clip.arch: {arch} is built with QuickGELU, but the weights use GELU")
    return open_clip.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"], quick_gelu=quick_gelu)


def build_visual(arch: str, quick_gelu: bool, tiny: dict | None = None) -> VisionTransformer:
    """A randomly initialised ViT image tower: open_clip's `arch`, or the sizes in `tiny`
    (image_size, patch_size, width, layers, heads, output_dim) when given."""
    if tiny:
        return VisionTransformer(mlp_ratio=4.0, act_layer=QuickGELU if quick_gelu else nn.GELU, **tiny)
    visual = create_open_clip(arch, quick_gelu).visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"clip.arch: {arch} is not a ViT; CLIP targets need a ViT image tower")
    return visual


class FrozenCLIPImage(nn.Module):
    def __init__(self, visual: VisionTransformer, target: str = "tokens"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"clip.target: {target!r}, expected one of {', '.join(TARGETS)}")
        self.visual, self.image_size, self.target = visual.eval().requires_grad_(False), visual.image_size[0], target
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def target_shape(self) -> tuple[int, int]:
        v = self.visual
        n_patches = v.grid_size[0] * v.grid_size[1]
        return {"tokens": (n_patches + 1, v.output_dim), "pooled": (1, v.output_dim),
                "patch_tokens": (n_patches, v.transformer.width)}[self.target]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.target == "patch_tokens":
            if images.dtype == torch.uint8:
                images = images.permute(0, 3, 1, 2).float() / 255.0
            return sgm_preprocess(images, self.image_size, self.mean, self.std)
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.target == "pooled":
            return F.normalize(self.visual(x), dim=-1).unsqueeze(1)
        v = self.visual
        hidden = v.ln_post(v.transformer(v._embeds(x)))
        if self.target == "patch_tokens":
            return hidden[:, 1:]
        tokens = hidden @ v.proj
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)


def target_shape(arch: str, target: str, tiny: dict | None = None) -> tuple[int, int]:
    """(tokens, dim) of the targets `build_clip_image(arch, ..., target, tiny=tiny)` gives,
    from the architecture's config alone (no weights, no model)."""
    if tiny:
        size, patch, dim, width = tiny["image_size"], tiny["patch_size"], tiny["output_dim"], tiny["width"]
    else:
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(f"clip.arch: {arch!r} is not an open_clip architecture")
        vision = config["vision_cfg"]
        size, patch, dim, width = vision["image_size"], vision["patch_size"], config["embed_dim"], vision["width"]
    n_patches = (size // patch) ** 2
    return {"tokens": (n_patches + 1, dim), "pooled": (1, dim), "patch_tokens": (n_patches, width)}[target]


def build_clip_image(arch: str, state: dict | None, target: str, quick_gelu: bool = False, seed: int = 0,
                     tiny: dict | None = None) -> FrozenCLIPImage:
    """The encoder of open_clip architecture `arch` (or of the sizes in `tiny`) holding the
    image tower of `state` (a CLIP state dict in OpenAI's layout).

    `state=None` gives a random encoder initialised from `seed` (tests and the embedded
    default), which needs `tiny`. A state that does not fit the architecture raises ValueError.
    """
    if state is None and not tiny:
        raise ValueError("clip.weights=random needs clip.tiny sizes (image_size, patch_size, width, layers, heads, output_dim)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = build_visual(arch, quick_gelu, tiny)
    if state is not None:
        load_strict(visual, state, "visual.")
    return FrozenCLIPImage(visual, target)
