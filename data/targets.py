"""Per-image targets (CLIP tokens, VAE latents, resized stimuli), computed once per
(dataset, encoder, subject) and cached on disk.

The cache holds `ids.npy` (image ids) and `targets.npy` (float16, or uint8 for images,
[N, ...]); runs open it memory-mapped, so ranks on one node share one copy in the page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from data.shards import MANIFEST, decode_image
from data.splits import iter_split


class TargetTable:
    """Row lookup of cached targets by image id."""

    def __init__(self, folder: Path):
        self.ids = np.load(folder / "ids.npy")
        self.values = np.load(folder / "targets.npy", mmap_mode="r")
        self._row = {int(i): r for r, i in enumerate(self.ids)}

    def __getitem__(self, image_ids) -> torch.Tensor:
        """Rows for `image_ids`: float32, or uint8 for an image table."""
        rows = [self._row[int(i)] for i in image_ids]
        values = np.asarray(self.values[rows])
        return torch.from_numpy(values if values.dtype == np.uint8 else values.astype(np.float32))


def _cache_folder(cache: Path, dataset: Path, key: dict, subject: int) -> Path:
    data_fp = hashlib.sha256((dataset / MANIFEST).read_bytes()).hexdigest()[:12]
    key_fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache / "targets" / f"{data_fp}-{key_fp}" / f"subj{subject:02d}"


def cached_targets(encoder: Callable[[torch.Tensor], torch.Tensor], key: dict, dataset: Path, manifest: dict,
                   subject: int, cache: Path, batch_size: int = 64, what: str = "CLIP targets") -> TargetTable:
    """`encoder(uint8 images [B, H, W, 3])` for every image the subject saw (all splits),
    computed on first use. `key` identifies the encoder (architecture, weights, kind) in the
    cache name; `what` names the work in the progress bar.
    """
    folder = _cache_folder(cache, dataset, key, subject)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "targets.npy").is_file():
            _compute(encoder, dataset, manifest, subject, folder, batch_size, what)
    return TargetTable(folder)


def _compute(encoder, dataset, manifest, subject, folder: Path, batch_size: int, what: str) -> None:
    ids, images, out = [], [], []
    seen: set[int] = set()

    def flush():
        values = encoder(torch.from_numpy(np.stack(images)))
        out.append((values if values.dtype == torch.uint8 else values.to(torch.float16)).cpu().numpy())
        images.clear()

    total = sum(s["n_samples"] for s in manifest["subjects"][str(subject)]["splits"].values())
    with torch.inference_mode(), tqdm(total=total, desc=f"{what}, subject {subject}", mininterval=2) as bar:
        for split in manifest["subjects"][str(subject)]["splits"]:
            for sample in iter_split(dataset, manifest, subject, split, with_images=True):
                bar.update()
                if sample["image_id"] in seen:
                    continue
                seen.add(sample["image_id"])
                ids.append(sample["image_id"])
                images.append(decode_image(sample["image_png"]))
                if len(images) == batch_size:
                    flush()
        if images:
            flush()
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "ids.npy", np.asarray(ids, dtype=np.int64))
    np.save(tmp / "targets.npy", np.concatenate(out))
    os.replace(tmp, folder)
