"""Image sets to score: a dataset split's stimuli, and reconstructions from a folder or a tensor file.

Every image set is brought to float [N, 3, 256, 256] in [0, 1] (bilinear; antialiased only
under the "antialias" resize convention, see eval/resize.py) before any metric, as MindEye's
metric code does (`transforms.Resize((256, 256))` on float tensors); several generations per
image give [N, G, 3, 256, 256].

Reconstructions come as
- a folder of image files named by test sample id: `<id>.png` (one per image), or
  `<id>_<g>.png` for generations g = 0..G-1 (Takagi's protocol);
- a tensor file (`.pt`, `.npy`): a tensor [N, 3, H, W] or [N, G, 3, H, W] in test-split
  order, or (`.pt`) a dict {"image_ids": [...], "images": tensor}; float in [0, 1] or uint8.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

from data.files import load_tensors
from data.shards import DataError, decode_image, sample_image
from data.splits import iter_split
from eval.resize import resize
from models.errors import InputError

SIZE = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # image files read from folders
_NAME = re.compile(r"^(\d+)(?:_(\d+))?$")


class ReconstructionError(InputError):
    """Reconstructions that cannot be matched to the test split; the message names the file or id."""


def to_unit(images: torch.Tensor, source: str, convention: str = "reference") -> torch.Tensor:
    """uint8 or float images -> float32 in [0, 1] at SIZE x SIZE; channels first."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = images.float()
    if not torch.isfinite(images).all():
        raise ReconstructionError(f"{source}: images hold NaN or Inf values")
    if images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise ReconstructionError(f"{source}: float images must lie in [0, 1] (found {images.min():.3g}..{images.max():.3g})")
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:]).clamp(0, 1)  # clamped before resizing, as MindEye's metric code
    if flat.shape[1] != 3:
        raise ReconstructionError(f"{source}: expected RGB images [..., 3, H, W], got shape {tuple(images.shape)}")
    if flat.shape[-2:] != (SIZE, SIZE):
        flat = resize(flat, SIZE, convention=convention)
    return flat.view(*lead, 3, SIZE, SIZE)


def split_images(root: Path, manifest: dict, subject: int, split: str = "test",
                 convention: str = "reference") -> tuple[list[int], torch.Tensor]:
    """The stimuli of one subject's split, in split order: (image ids, float [N, 3, 256, 256])."""
    ids, images = [], []
    for sample in iter_split(root, manifest, subject, split, with_images=True):
        ids.append(sample["image_id"])
        images.append(torch.from_numpy(sample_image(sample)).permute(2, 0, 1))
    if not ids:
        raise DataError(f"{root}: subject {subject} split {split!r} has no samples")
    return ids, to_unit(torch.stack(images), f"{root} ({split} split)", convention)


def _read_image(path: Path) -> torch.Tensor:
    try:
        return torch.from_numpy(decode_image(path.read_bytes())).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise ReconstructionError(f"{path}: unreadable image ({type(e).__name__})") from None


def _from_folder(folder: Path, ids: list[int], convention: str) -> torch.Tensor:
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        m = _NAME.match(path.stem)
        if not m:
            raise ReconstructionError(f"{path}: name is not <test id>.png or <test id>_<generation>.png")
        found.setdefault(int(m[1]), {})[int(m[2] or 0)] = path
    wanted = set(ids)
    for image_id in ids:
        if image_id not in found:
            raise ReconstructionError(f"{folder}: no reconstruction for test id {image_id} (expected {image_id}.png)")
    for image_id in found:
        if image_id not in wanted:
            raise ReconstructionError(f"{folder}: id {image_id} ({found[image_id][min(found[image_id])].name}) is not in the test split")
    n_gen = {len(found[i]) for i in ids}
    if len(n_gen) > 1:
        raise ReconstructionError(f"{folder}: test ids have different numbers of generations ({sorted(n_gen)})")
    g = n_gen.pop()
    for image_id in ids:
        if sorted(found[image_id]) != list(range(g)):
            raise ReconstructionError(f"{folder}: id {image_id} has generations {sorted(found[image_id])}, expected 0..{g - 1}")
    images = []
    for image_id in ids:
        per_id = [to_unit(_read_image(found[image_id][k])[None], str(found[image_id][k]), convention)[0] for k in range(g)]
        images.append(torch.stack(per_id))
    out = torch.stack(images)
    return out[:, 0] if g == 1 else out


def _from_file(path: Path, ids: list[int], convention: str) -> torch.Tensor:
    obj = load_tensors(path, ReconstructionError, "unreadable tensor file")
    given_ids = None
    if isinstance(obj, dict):
        if "images" not in obj:
            raise ReconstructionError(f"{path}: a dict of reconstructions needs an 'images' entry")
        given_ids, obj = obj.get("image_ids"), obj["images"]
    images = torch.as_tensor(np.asarray(obj)) if not isinstance(obj, torch.Tensor) else obj
    if images.dim() not in (4, 5):
        raise ReconstructionError(f"{path}: expected [N, 3, H, W] or [N, G, 3, H, W], got shape {tuple(images.shape)}")
    if given_ids is not None:
        given = [int(i) for i in given_ids]
        if len(given) != len(images):
            raise ReconstructionError(f"{path}: {len(given)} image_ids for {len(images)} images")
        row = {i: r for r, i in enumerate(given)}
        for image_id in ids:
            if image_id not in row:
                raise ReconstructionError(f"{path}: no reconstruction for test id {image_id}")
        extra = set(given) - set(ids)
        if extra:
            raise ReconstructionError(f"{path}: id {min(extra)} is not in the test split")
        images = images[[row[i] for i in ids]]
    elif len(images) != len(ids):
        raise ReconstructionError(f"{path}: {len(images)} reconstructions for {len(ids)} test samples")
    return to_unit(images, str(path), convention)


def load_reconstructions(path: Path, ids: list[int], convention: str = "reference") -> torch.Tensor:
    """Reconstructions for the test ids `ids`, in that order: float [N, 3, 256, 256] or [N, G, 3, 256, 256]."""
    path = Path(path)
    if path.is_dir():
        return _from_folder(path, ids, convention)
    if path.is_file():
        return _from_file(path, ids, convention)
    raise ReconstructionError(f"{path}: reconstructions not found (a folder of <test id>.png files or a .pt/.npy tensor file)")
