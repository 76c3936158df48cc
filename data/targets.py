"""Per-image targets (CLIP tokens, VAE latents, resized stimuli, CLIP features), computed
once per (dataset, encoder, subjects) and cached on disk.

The cache holds `ids.npy` (image ids) and `targets.npy` (float16, or uint8 for images,
[N, ...]); runs open it memory-mapped, so ranks on one node share one copy in the page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from data.shards import MANIFEST, sample_image
from data.splits import iter_split
from models.stimuli import resize_stimuli


def stimuli_at(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `compute` of cached stimuli at `size` px (uint8 [B, 3, size, size]); every recipe
    caches them under the key {"kind": "images", "size": size}."""
    return lambda images: (resize_stimuli(images, size) * 255).round().to(torch.uint8)


class TargetTable:
    """Row lookup of cached targets by image id."""

    def __init__(self, folder: Path):
        self.ids = np.load(folder / "ids.npy")
        self.values = np.load(folder / "targets.npy", mmap_mode="r")
        self._row = {int(i): r for r, i in enumerate(self.ids)}

    def rows(self, image_ids) -> torch.Tensor:
        """Rows for `image_ids` as stored (float16, or uint8 for an image table): the training
        step converts them after moving them to its device, where that costs nothing."""
        return torch.from_numpy(np.asarray(self.values[[self._row[int(i)] for i in image_ids]]))

    def __getitem__(self, image_ids) -> torch.Tensor:
        """Rows for `image_ids`: float32, or uint8 for an image table."""
        values = self.rows(image_ids)
        return values if values.dtype == torch.uint8 else values.float()


def _cache_folder(cache: Path, dataset: Path, key: dict, subjects: list[int]) -> Path:
    data_fp = hashlib.sha256((dataset / MANIFEST).read_bytes()).hexdigest()[:12]
    key_fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    if len(subjects) == 1:
        name = f"subj{subjects[0]:02d}"
    else:
        name = f"{len(subjects)}subjects-" + hashlib.sha256(json.dumps(subjects).encode()).hexdigest()[:10]
    return cache / "targets" / f"{data_fp}-{key_fp}" / name


def cached_targets(encoder: Callable[..., torch.Tensor], key: dict, dataset: Path, manifest: dict,
                   subjects: int | Sequence[int], cache: Path, batch_size: int = 64, what: str = "CLIP targets",
                   with_captions: bool = False) -> TargetTable:
    """`encoder(uint8 images [B, H, W, 3])` (with `with_captions`, `encoder(images, captions)`
    with the list of each image's captions) for every image the subjects saw (all splits), computed
    on first use. `key` identifies the encoder (architecture, weights, kind) in the cache
    name; `what` names the work in the progress bar.
    """
    subjects = [subjects] if isinstance(subjects, int) else sorted(subjects)
    folder = _cache_folder(cache, dataset, key, subjects)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "targets.npy").is_file():
            _compute(encoder, dataset, manifest, subjects, folder, batch_size, what, with_captions)
    return TargetTable(folder)


def _compute(encoder, dataset, manifest, subjects: list[int], folder: Path, batch_size: int, what: str,
             with_captions: bool) -> None:
    ids, images, captions, out = [], [], [], []
    seen: set[int] = set()

    def flush():
        batch = torch.from_numpy(np.stack(images))
        values = encoder(batch, list(captions)) if with_captions else encoder(batch)
        out.append((values if values.dtype == torch.uint8 else values.to(torch.float16)).cpu().numpy())
        images.clear()
        captions.clear()

    entries = [manifest["subjects"][str(s)]["splits"] for s in subjects]
    total = sum(split["n_samples"] for splits in entries for split in splits.values())
    label = f"subject {subjects[0]}" if len(subjects) == 1 else f"{len(subjects)} subjects"
    with torch.inference_mode(), tqdm(total=total, desc=f"{what}, {label}", mininterval=2) as bar:
        for subject, splits in zip(subjects, entries):
            for split in splits:
                for sample in iter_split(dataset, manifest, subject, split, with_images=True):
                    bar.update()
                    if sample["image_id"] in seen:
                        continue
                    seen.add(sample["image_id"])
                    ids.append(sample["image_id"])
                    images.append(sample_image(sample))
                    captions.append(list(sample["captions"]))
                    if len(images) == batch_size:
                        flush()
        if images:
            flush()
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "ids.npy", np.asarray(ids, dtype=np.int64))
    np.save(tmp / "targets.npy", np.concatenate(out))
    os.replace(tmp, folder)
