"""The image masked autoencoder of DC-MAE phase 2: ViT-MAE (He et al. 2022) on the shared
masked-autoencoder core (models/mae.py).

Defaults are ViT-MAE base: 224 px images in 16 px patches (Conv2d), 768 wide x 12 blocks,
12 heads, MLP ratio 4; decoder 512 wide x 8 blocks, 16 heads; fixed 2-D sin-cos positions
with an all-zero class-token row; LayerNorm eps 1e-6 (the official MAE's). Inputs are images normalised by the
ImageNet mean and std; the targets are the normalised pixels of each patch in MAE's order
(row, column, channel within a patch), so an official checkpoint's decoder_pred fits.

`build_image_mae` loads the state dict of an official MAE checkpoint (the facebookresearch
`.pth`, a "model" dict in timm layout, with the decoder: e.g. mae_visualize_vit_base.pth,
read by data/pretrained_weights.py) by `models.mae.from_timm_mae`; its position tables are
checked against ours, not loaded.
"""
from __future__ import annotations

import torch
from torch import nn

from models.mae import MaskedAutoencoder, from_timm_mae
from models.mbm import sincos_positions
from models.strict_load import StateMismatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sincos_positions_2d(side: int, dim: int) -> torch.Tensor:
    """MAE's fixed table [1 + side^2, dim]: an all-zero class-token row, then patches in row-major
    order; patch (row i, column j) has the 1-D sin-cos code of j in the first dim / 2 channels
    and that of i in the last dim / 2."""
    codes = sincos_positions(side, dim // 2)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    table = torch.cat((codes[cols.flatten()], codes[rows.flatten()]), dim=1)
    return torch.cat((torch.zeros(1, dim), table))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (the cached stimuli) -> float, ImageNet mean / std normalised (MAE's input)."""
    x = images.float() / 255.0
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


class ImageMAE(MaskedAutoencoder):
    def __init__(self, image_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, checkpoint_blocks: bool = False, norm_eps: float = 1e-6):
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        side = image_size // patch_size
        super().__init__(nn.Conv2d(3, dim, patch_size, stride=patch_size), side * side, 3 * patch_size**2,
                         sincos_positions_2d(side, dim), sincos_positions_2d(side, decoder_dim), dim, depth, heads,
                         mlp_ratio, decoder_dim, decoder_depth, decoder_heads, mask_ratio, checkpoint_blocks, norm_eps)
        self.image_size, self.patch_size, self.side = image_size, patch_size, side

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(images).flatten(2).transpose(1, 2)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, side^2, p * p * 3]: patches row-major, pixels (row, column, channel)."""
        b, p, s = len(images), self.patch_size, self.side
        x = images.reshape(b, 3, s, p, s, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, s * s, p * p * 3)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """The inverse of `patchify`."""
        b, p, s = len(patches), self.patch_size, self.side
        return patches.reshape(b, s, s, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, s * p, s * p)


def build_image_mae(state: dict[str, torch.Tensor] | None, seed: int = 0, **arch) -> ImageMAE:
    """`state`: an official MAE state dict with its decoder (the checkpoint's "model" dict), or
    None for an initialisation from `seed`; `arch`: ImageMAE's arguments, which must match the
    state. A state that does not fit raises StateMismatch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageMAE(**arch)
    if state is None:
        return model
    try:
        ours, tables = from_timm_mae(state)
    except KeyError as e:
        raise StateMismatch(f"not an official MAE checkpoint ({e.args[0]})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in ours]
    if missing:
        what = "has no decoder: phase 2 needs the full MAE with its decoder" if missing[0].startswith("decoder") \
            else "is not an official MAE checkpoint"
        raise StateMismatch(f"{what} (no weights for {missing[0]})")
    for k, v in ours.items():
        if k not in expected or v.shape != expected[k].shape:
            raise StateMismatch(f"{k} has shape {tuple(v.shape)}, but image_mae's sizes give "
                                f"{tuple(expected[k].shape) if k in expected else 'no such weight'}")
    for name, table in tables.items():
        ref = getattr(model, name)
        if table.shape != ref.shape or not torch.allclose(table.float(), ref, atol=1e-4):
            raise StateMismatch(f"{name} is not MAE's fixed 2-D sin-cos table for these sizes")
    model.load_state_dict(ours)
    return model
