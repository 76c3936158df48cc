"""Small file helpers: atomic writes, and JSON and tensor-file reads whose errors name the file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers never see a half-written file. If
    the write fails (a full disk), the temporary file is removed and the OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json(path: Path, error: type[Exception], missing: str) -> dict:
    """Parse a JSON file; a missing or invalid file raises `error` naming it (`missing` says what it is)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def load_tensors(path: Path, error: type[Exception], what: str):
    """A `.npy` array or a torch file (tensors and plain containers only, no pickled code);
    a file that cannot be read raises `error` as "<path>: <what> (<reason>)"."""
    path = Path(path)
    try:
        return np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise error(f"{path}: {what} ({type(e).__name__})") from None
