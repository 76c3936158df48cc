"""The project's one shard format: webdataset tars plus a JSON manifest.

Layout of a dataset folder:

    manifest.json
    subj01/train-000000.tar, subj01/val-000000.tar, subj01/test-000000.tar, ...

Each sample in a shard holds:
    __key__       "s{subject:02d}_{image_id:06d}" (a repeat of an image within a split: "_1", "_2", ...)
    voxels.npy    float16 [n_repeats, n_voxels], the single-trial responses to one image
    image.png     the stimulus, RGB uint8 (or image.jpg: a JPEG kept as published; or no
                  image at all, for data without stimuli such as resting state)
    labels.npy    float32 [n_categories] multi-hot category vector
    sessions.npy  optional int64 [n_repeats], the 1-based scan session of each trial (row of voxels.npy)
    json          {"image_id", "subject", "captions": [...]}

The manifest records the generator or converter, the subjects with their voxel counts
and ROI voxel indices, the split sizes, and every shard's size and sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from data.files import read_json
from models.errors import InputError

MANIFEST = "manifest.json"
FORMAT = "fmri-shards/1"


class DataError(InputError):
    """Bad input data; the message names the file."""


def sample_key(subject: int, image_id: int) -> str:
    return f"s{subject:02d}_{image_id:06d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Sample:
    subject: int
    image_id: int
    voxels: np.ndarray  # [n_repeats, n_voxels]
    image: np.ndarray | bytes | None  # uint8 [H, W, 3] (stored as PNG), JPEG file bytes, or no stimulus
    labels: np.ndarray  # [n_categories]
    captions: list[str]
    sessions: np.ndarray | None = None  # [n_repeats], the 1-based scan session of each trial, if known


def encode_sample(s: Sample) -> dict[str, bytes]:
    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    meta = {"image_id": int(s.image_id), "subject": int(s.subject), "captions": list(s.captions)}
    fields = {"voxels.npy": npy(s.voxels.astype(np.float16))}
    if isinstance(s.image, np.ndarray):
        fields["image.png"] = encode_png(s.image)
    elif s.image is not None:
        fields["image.jpg"] = bytes(s.image)
    if s.sessions is not None:
        fields["sessions.npy"] = npy(np.asarray(s.sessions, np.int64))
    return {**fields, "labels.npy": npy(s.labels.astype(np.float32)), "json": json.dumps(meta).encode()}


class ShardWriter:
    """Writes samples into numbered tar shards of at most `max_bytes`, recording checksums.

    Shards are written under a temporary name and renamed when complete, so a killed
    writer never leaves a truncated shard under a final name. Numbering starts at
    `first_index` (a resumed writer continues after the shards it already has);
    `on_close(rel, record)` is called as each shard is completed.
    """

    def __init__(self, root: Path, prefix: str, max_bytes: int = 1 << 30, first_index: int = 0,
                 on_close: Callable[[str, dict], None] | None = None):
        self.root, self.prefix, self.max_bytes = Path(root), prefix, max_bytes
        self.first_index, self.on_close = first_index, on_close
        self.shards: dict[str, dict] = {}
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _open(self) -> None:
        rel = f"{self.prefix}-{self.first_index + len(self.shards):06d}.tar"
        self._rel, self._path = rel, self.root / rel
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path.with_name(f".{self._path.name}.tmp")
        self._tar = tarfile.open(self._tmp, "w")
        self._count = 0
        self.shards[rel] = {}

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        os.replace(self._tmp, self._path)
        self.shards[self._rel] = {"n_samples": self._count, "bytes": self._path.stat().st_size, "sha256": sha256(self._path)}
        self._tar = None
        if self.on_close is not None:
            self.on_close(self._rel, self.shards[self._rel])

    def write(self, s: Sample) -> None:
        self.write_encoded(sample_key(s.subject, s.image_id), encode_sample(s))

    def write_encoded(self, key: str, fields: dict[str, bytes]) -> None:
        """Write one sample already encoded by `encode_sample` (e.g. in a worker process)."""
        if self._tar is None:
            self._open()
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # reproducible bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._tar.fileobj.tell() >= self.max_bytes:
            self._close()

    def close(self) -> dict[str, dict]:
        if self._tar is not None:
            self._close()
        return self.shards


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    manifest = read_json(path, DataError, "no manifest (is this a converted dataset folder?)")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def split_shards(root: Path, manifest: dict, subject: int, split: str) -> list[Path]:
    subjects = manifest["subjects"]
    if str(subject) not in subjects:
        raise DataError(f"{Path(root) / MANIFEST}: no subject {subject} (has {sorted(subjects, key=int)})")
    splits = subjects[str(subject)]["splits"]
    if split not in splits:
        raise DataError(f"{Path(root) / MANIFEST}: subject {subject} has no split {split!r}")
    return [Path(root) / rel for rel in splits[split]["shards"]]


def verify_shard(root: Path, manifest: dict, path: Path) -> None:
    """Existence and checksum against the manifest; raises DataError naming the file."""
    rel = path.relative_to(root).as_posix()
    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    expected = manifest["shards"][rel]["sha256"]
    if sha256(path) != expected:
        raise DataError(f"{path}: corrupt shard (sha256 differs from the manifest)")


def decode_sample(fields: dict, shard: str, n_voxels: int) -> dict:
    """Turn one webdataset sample (raw bytes per field) into arrays, checking them."""
    key = fields["__key__"]
    try:
        voxels = np.load(io.BytesIO(fields["voxels.npy"]), allow_pickle=False)
        labels = np.load(io.BytesIO(fields["labels.npy"]), allow_pickle=False)
        meta = json.loads(fields["json"])
        sessions = np.load(io.BytesIO(fields["sessions.npy"]), allow_pickle=False) if "sessions.npy" in fields else None
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{shard}: sample {key} cannot be decoded ({type(e).__name__}: {e})") from None
    if voxels.ndim != 2 or voxels.shape[1] != n_voxels:
        raise DataError(f"{shard}: sample {key} has voxels of shape {voxels.shape}, manifest says {n_voxels} voxels")
    if not np.isfinite(voxels).all():
        raise DataError(f"{shard}: sample {key} has NaN or Inf voxels")
    if sessions is not None and (sessions.shape != voxels.shape[:1] or sessions.dtype.kind not in "iu"):
        raise DataError(f"{shard}: sample {key} has sessions of shape {sessions.shape} ({sessions.dtype}), expected "
                        f"integers [{len(voxels)}] (one per trial)")
    return {"key": key, "image_id": int(meta["image_id"]), "subject": int(meta["subject"]), "voxels": voxels, "labels": labels,
            "captions": meta["captions"], "image": fields.get("image.png", fields.get("image.jpg")), "sessions": sessions}


def sample_image(sample: dict) -> np.ndarray:
    """The decoded stimulus of a sample from `decode_sample`; DataError if it has none."""
    if sample["image"] is None:
        raise DataError(f"sample {sample['key']}: no stimulus image (a dataset without images, e.g. resting state)")
    return decode_image(sample["image"])


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB array -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> a writable uint8 [H, W, 3] RGB array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))
