"""What the dataset converters share: input reads whose every problem is a one-line
`DataError` naming the file (and key), the checks of voxel values and stimulus images,
per-voxel z-scoring, the validation split, and split streams over a list of items."""
from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

from data.convert.output import SplitSource
from data.shards import DataError, Sample

T = TypeVar("T")
NO_LABELS = np.zeros(0, np.float32)  # labels of a dataset without categories
CHUNK = 4096  # rows per step of the statistics pass


def reason(e: Exception) -> str:
    """An exception as one line, for error messages."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def require(path: Path, what: str = "input file") -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} missing")
    return path


def read_lines(path: Path, what: str) -> list[str]:
    """The file's lines, stripped, blank ones dropped."""
    try:
        text = require(path, what).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable {what} ({reason(e)})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def tar_samples(tar: tarfile.TarFile):
    """(key, {field: member}) of each sample of an open webdataset tar, in order (a sample's files are
    adjacent), split as webdataset splits names (`base_plus_ext`, fields lower-cased)."""
    named = ((*base_plus_ext(m.name), m) for m in tar if m.isreg())
    for key, group in itertools.groupby((n for n in named if n[0] is not None), key=lambda n: n[0]):
        yield key, {field.lower(): m for _, field, m in group}


def npy_bytes(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable array gets the same one-line error
        raise DataError(f"{where}: not a readable .npy array ({reason(e)})") from None


def read_tar(path: Path, read: Callable[[tarfile.TarFile, str, dict], T]) -> list[T]:
    """`read(tar, key, members)` of every sample of a webdataset tar (`tar_samples`), in order; a
    DataError names the tar if it is unreadable (truncated?) or holds no sample."""
    try:
        with tarfile.open(path) as tar:
            out = [read(tar, key, members) for key, members in tar_samples(tar)]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar ({reason(e)}); truncated?") from None
    if not out:
        raise DataError(f"{path}: no samples (an empty tar)")
    return out


def check_voxels(dtype, where: str, scaled: bool = True) -> None:
    """Voxel values must be real numbers (not strings, objects, booleans or complex numbers).
    Integers only where the converter scales them (`scaled`: it z-scores them): stored
    unscaled as float16 they would keep whatever units they came in, and float16 holds
    integers exactly only up to 2048."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise DataError(f"{where} holds {dtype} values, expected numeric voxel values")
    if not scaled and dtype.kind in "iu":
        raise DataError(f"{where} holds integer ({dtype}) voxels, which this converter would store unscaled as float16 "
                        "(exact only up to 2048; it has no option to scale them); convert them to float (e.g. z-scored) "
                        "first")


def check_image(source: Path | bytes, where: str) -> tuple[int, int]:
    """The (width, height) of an image file or of encoded image bytes, decoded whole to check
    it (a truncated JPEG fails here, not in training); DataError naming `where` otherwise."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
            im.load()
            return im.size
    except Exception as e:  # noqa: BLE001 - any unreadable image gets the same one-line error
        raise DataError(f"{where}: unreadable image ({reason(e)})") from None


def check_shape(actual: tuple[int, ...], where: str, shape: tuple[int | None, ...], note: str = "") -> None:
    """`actual` must be `shape` (None: any size on that axis); `where` and `note` as for `check_array`."""
    if len(actual) != len(shape) or any(n is not None and n != m for n, m in zip(shape, actual)):
        expected = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ")"
        raise DataError(f"{where} has shape {tuple(actual)}, expected {expected}{f' ({note})' if note else ''}")


def check_array(a: np.ndarray, where: str, shape: tuple[int | None, ...], note: str = "",
                voxels: bool = False) -> np.ndarray:
    """`a` must have `shape` (None: any size on that axis) and, if floating point, only finite
    values; `voxels`: numeric values as `check_voxels` wants them (the converter z-scores them).
    `where` ("<file>: key 'x'") and `note` (what the expected sizes come from) go into the error."""
    if voxels:
        check_voxels(a.dtype, where)
    check_shape(a.shape, where, shape, note)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataError(f"{where} has NaN or Inf values (first at index {tuple(np.argwhere(~np.isfinite(a))[0].tolist())})")
    return a


def load_npy(path: Path, shape: tuple[int | None, ...], note: str = "", voxels: bool = False) -> np.ndarray:
    require(path)
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise DataError(f"{path}: unreadable .npy file ({reason(e)})") from None
    return check_array(a, str(path), shape, note, voxels)


def open_npz(path: Path):
    """An npz archive, opened lazily: `npz_array` reads its arrays one at a time."""
    require(path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: unreadable .npz file ({reason(e)})") from None


def npz_array(npz, path: Path, key: str, shape: tuple[int | None, ...], note: str = "",
              voxels: bool = False) -> np.ndarray:
    """`npz[key]` (from `open_npz(path)`), present, readable and checked as by `check_array`."""
    if key not in npz.files:
        raise DataError(f"{path}: no key {key!r} (has {sorted(npz.files)})")
    try:
        a = npz[key]
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt member
        raise DataError(f"{path}: key {key!r} unreadable ({reason(e)})") from None
    return check_array(a, f"{path}: key {key!r}", shape, note, voxels)


@dataclass
class VoxelStats:
    """Per-voxel mean and standard deviation; calling it z-scores trials [..., V] (float32)."""

    mean: np.ndarray
    std: np.ndarray

    def __call__(self, trials: np.ndarray) -> np.ndarray:
        return ((trials - self.mean) / self.std).astype(np.float32)


def voxel_stats(trials: np.ndarray, rows: Sequence[int] | None = None) -> VoxelStats:
    """Statistics over `rows` of trials [N, V] (every row if None), e.g. the training trials
    only. Accumulated in float64 a chunk of rows at a time, so a memory-mapped array is never
    copied whole; a constant voxel gets std 1 (it z-scores to 0)."""
    rows = np.arange(len(trials)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise ValueError("voxel_stats: no rows")
    chunks = [rows[s : s + CHUNK] for s in range(0, len(rows), CHUNK)]
    mean = sum(np.asarray(trials[c], np.float64).sum(0) for c in chunks) / len(rows)
    var = sum(np.square(np.asarray(trials[c], np.float64) - mean).sum(0) for c in chunks) / len(rows)
    std = np.sqrt(var)
    return VoxelStats(mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32))


def carve_val(image_ids: Sequence[int], n_val: int) -> set[int]:
    """The `n_val` image ids (of the training images `image_ids`) held out for validation: the
    first in a fixed hash order of the ids. The choice depends on nothing else, so an image that
    several subjects saw tends to fall in the same split for all of them. DataError (naming the
    `--val` option) unless 1 <= n_val < the number of images."""
    ids = sorted({int(i) for i in image_ids})
    if not 1 <= n_val < len(ids):
        raise DataError(f"--val {n_val}: expected 1 to {len(ids) - 1} validation images (of {len(ids)} training images)")
    return set(sorted(ids, key=lambda i: hashlib.sha256(str(i).encode()).digest())[:n_val])


def split_source(items: Sequence[T], make: Callable[[T], Sample]) -> SplitSource:
    """A split of one sample per item, `make(item)`, in the items' order from any start."""
    items = list(items)
    return SplitSource(len(items), lambda start: map(make, items[start:]))
