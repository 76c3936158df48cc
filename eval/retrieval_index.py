"""Nearest-neighbour search of CLIP image embeddings in a large local pool, read and written in
the folder layouts of clip-retrieval and autofaiss, so that a user's existing index opens
without conversion and ours opens in their tools.

Layout (the union of a `clip-retrieval inference` output folder and a `clip-retrieval index`
folder; each part is optional as listed under `open_index`):

    <folder>/img_emb/img_emb_{i}.npy        float16 [n_i, dim], L2-normalised rows
    <folder>/metadata/metadata_{i}.parquet  one row per vector (columns such as image_path, url, caption)
    <folder>/image.index                    a faiss index (inner product) of all vectors, in row order
    <folder>/image.json                     autofaiss' index infos (index_key, index_param, ...)

Rows are numbered across the npy parts in the order autofaiss reads them (embedding-reader:
every `*.npy` under img_emb/, sorted by path), which is the order of the faiss index's ids;
metadata rows follow the parquet files in the order clip-retrieval's back-end reads them
(`sorted(metadata/*.parquet)`), or its memory-mappable `metadata/**/*.arrow` files. The file
numbers `{i}` are zero-padded to the number of parts (clip-retrieval's rule), so the sort is
numeric too. A LAION index whose `image.index` is a folder (`populated.index` plus
`merged_index.ivfdata`, clip-retrieval's index_combiner) opens too.

Search is by inner product; the caller L2-normalises the queries. `ExactIndex` scans the
float16 embedding files memory-mapped, a chunk at a time, with a running top-k, so that a pool
of millions never needs a float32 copy; ties go to the lower row. The faiss kinds are
approximate: "faiss-ivfpq" (IVF with product quantisation; when the folder has the embedding
files, its shortlist of `rerank * k` candidates is re-scored exactly from them, so its scores
are those of the exact index and its recall far above IVF-PQ's own), "faiss-hnsw"
(IndexHNSWFlat) and "faiss" (a user's faiss file of another type, e.g. autofaiss'
`OPQ..,IVF.._HNSW32,PQ..`, re-ranked the same way when the embeddings are there).

faiss (`faiss-cpu`) and pyarrow are the optional extra `fmridecode[retrieval]`, imported only
when a faiss file or parquet metadata is read or written. Every bad input raises
`IndexFolderError` (an `InputError`, so a `ValueError`) with one line naming the file.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from models.errors import InputError

EMB_DIR, META_DIR = "img_emb", "metadata"
IMAGE_INDEX, INDEX_INFOS = "image.index", "image.json"
EXTRA = "pip install 'fmridecode[retrieval]'"
ROWS_PER_PART = 10**6  # clip-retrieval inference's write_batch_size
CHUNK_ROWS = 2**16  # exact search: pool rows scanned per step (float32 copy: CHUNK_ROWS * dim * 4 bytes)
QUERY_BLOCK = 1024  # exact search: queries per pass (score block: QUERY_BLOCK * CHUNK_ROWS * 4 bytes)
RERANK = 10  # re-ranked shortlist: RERANK * k candidates
PARQUET_CACHE = 16  # metadata: decoded parquet columns kept (one per file and column; arrow files are mapped)


class IndexFolderError(InputError):
    """A missing, unreadable or inconsistent index file or folder; the message names it."""


def _faiss():
    try:
        import faiss  # the optional extra, imported only when needed
    except ImportError:
        raise IndexFolderError(f"faiss is not installed (approximate indexes need it): {EXTRA}") from None
    return faiss


def _pyarrow():
    try:
        import pyarrow  # the optional extra, imported only when needed
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise IndexFolderError(f"pyarrow is not installed (parquet metadata needs it): {EXTRA}") from None
    return pyarrow


# ---------------------------------------------------------------------------------------------
# Metadata


class Metadata:
    """One row per pool vector, in index order, read lazily from clip-retrieval's parquet or
    arrow files, or the row numbers (column "row") when there is no metadata. Opening reads
    only the files' footers (row counts, columns); a column is decoded per file when first
    asked for, the last PARQUET_CACHE of them kept (arrow files are memory-mapped, zero-copy:
    at LAION scale, clip-retrieval's parquet_to_arrow output is the fast choice). Columns
    are the union over the files (clip-retrieval's extra metadata columns may differ between
    parts), None where a file lacks one."""

    def __init__(self, files: Sequence[Path] = (), n_rows: int | None = None):
        self.files = [Path(f) for f in files]
        self._cache: OrderedDict[tuple[int, str], object] = OrderedDict()  # (file, column) -> arrow column
        if not self.files:
            self.columns = ["row"]
            self.offsets = np.array([0, n_rows or 0], dtype=np.int64)
            return
        pa = _pyarrow()
        counts, columns, self._has = [], [], []
        for path in self.files:
            try:
                if path.suffix == ".arrow":
                    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                    schema, n = reader.schema, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                else:
                    meta = pa.parquet.ParquetFile(path)
                    schema, n = meta.schema_arrow, meta.metadata.num_rows
            except (OSError, pa.ArrowException) as e:
                raise IndexFolderError(f"{path}: not a readable {path.suffix[1:]} metadata file ({_first_line(e)})") from None
            names = [c for c in schema.names if not c.startswith("__index_level_")]  # pandas' index
            columns += [c for c in names if c not in columns]  # parts may differ (clip-retrieval's
            self._has.append(set(names))  # json-normalised extra metadata): their union, None where absent
            counts.append(n)
        self.columns = columns
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _file_column(self, i: int, name: str):
        key = (i, name)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            pa, path = _pyarrow(), self.files[i]
            if name not in self._has[i]:
                self._cache[key] = pa.nulls(int(self.offsets[i + 1] - self.offsets[i]))
                return self._cache[key]
            try:
                if path.suffix == ".arrow":
                    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()  # zero-copy
                else:
                    table = pa.parquet.read_table(path, columns=[name], use_threads=False)
            except (OSError, pa.ArrowException) as e:
                raise IndexFolderError(f"{path}: not a readable metadata file ({_first_line(e)})") from None
            self._cache[key] = table.column(name)
            parquet = [k for k in self._cache if self.files[k[0]].suffix != ".arrow"]
            for k in parquet[:-PARQUET_CACHE]:  # decoded parquet columns held: the most recent few
                del self._cache[k]
        return self._cache[key]

    def column(self, name: str, rows: torch.Tensor | np.ndarray | Sequence[int] | None = None) -> list:
        """The column's values for every row, or for `rows` (any shape; nested lists of that
        shape; row -1, which an approximate search gives when it found fewer than k, is None)."""
        if name not in self.columns:
            raise KeyError(f"no metadata column {name!r} (columns: {', '.join(self.columns)})")
        if rows is None:
            if not self.files:
                return list(range(len(self)))
            return [v for i in range(len(self.files)) for v in self._file_column(i, name).to_pylist()]
        idx = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        shape, idx = idx.shape, idx.reshape(-1).astype(np.int64)
        bad = (idx < -1) | (idx >= len(self))
        if bad.any():
            raise IndexError(f"metadata row {int(idx[bad][0])} is out of range (0..{len(self) - 1})")
        out: list = [None] * idx.size
        if not self.files:
            out = [int(r) if r >= 0 else None for r in idx]
        else:
            part = np.searchsorted(self.offsets, idx, side="right") - 1
            for i in np.unique(part[idx >= 0]):
                where = np.nonzero((part == i) & (idx >= 0))[0]
                values = self._file_column(int(i), name).take(idx[where] - self.offsets[i]).to_pylist()
                for w, v in zip(where, values):
                    out[w] = v
        return _nest(out, shape)


def _nest(flat: list, shape: tuple[int, ...]):
    if len(shape) <= 1:
        return flat if shape else flat[0]
    step = int(np.prod(shape[1:]))
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Embedding files


class Embeddings:
    """The npy parts of a pool, memory-mapped and numbered consecutively in the given order."""

    def __init__(self, paths: Sequence[Path]):
        self.paths, self.arrays, counts, self.dim = [], [], [], None
        for path in paths:
            path = Path(path)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise IndexFolderError(f"{path}: not a readable .npy file ({_first_line(e)})") from None
            shape, dtype = array.shape, array.dtype
            if len(shape) != 2 or dtype not in (np.float16, np.float32) or not array.flags.c_contiguous:
                order = "" if array.flags.c_contiguous else " in Fortran order"
                raise IndexFolderError(f"{path}: expected a float16 or float32 [n, dim] array, found {dtype} {list(shape)}{order}")
            if shape[0] == 0:  # embedding-reader skips empty parts
                continue
            if self.dim is None:
                self.dim = int(shape[1])
            elif shape[1] != self.dim:
                raise IndexFolderError(f"{path}: vectors of dimension {shape[1]}, but {self.paths[0]} has {self.dim}")
            self.paths.append(path)
            self.arrays.append(array)
            counts.append(int(shape[0]))
        if not self.paths:
            raise IndexFolderError(f"{Path(paths[0]).parent if paths else '?'}: no vectors (every .npy file is empty)")
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chunks(self, chunk_rows: int):
        """(first pool row, part number, float16/32 numpy view) over the pool; a chunk never spans two parts."""
        for i, array in enumerate(self.arrays):
            for a in range(0, len(array), chunk_rows):
                yield int(self.offsets[i]) + a, i, array[a:a + chunk_rows]

    def row_error(self, row: int) -> IndexFolderError:
        """The error naming the file and row of pool row `row`, which is not finite."""
        part = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return IndexFolderError(f"{self.paths[part]}: row {row - int(self.offsets[part])} is not finite (NaN or inf)")

    def check_finite(self, first: int, block: np.ndarray) -> None:
        """Raise naming the file and row if `block` (float32, pool rows from `first` on) holds NaN or inf."""
        if not np.isfinite(block).all():
            raise self.row_error(first + int(np.nonzero(~np.isfinite(block).all(axis=1))[0][0]))

    def gather(self, rows: np.ndarray, check: bool = True) -> torch.Tensor:
        """float32 [len(rows), dim] of 1-D int64 `rows` (all in range), read in ascending order;
        `check`: raise if one is not finite."""
        if len(rows) == 0:
            return torch.empty(0, self.dim)
        uniq, inverse = np.unique(rows, return_inverse=True)
        bounds = np.searchsorted(uniq, self.offsets)
        blocks = [torch.from_numpy(array[uniq[bounds[i]:bounds[i + 1]] - self.offsets[i]]).float()
                  for i, array in enumerate(self.arrays) if bounds[i + 1] > bounds[i]]
        out = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        if check:
            finite = torch.isfinite(out).all(dim=1)
            if not bool(finite.all()):
                raise self.row_error(int(uniq[int((~finite).nonzero()[0, 0])]))
        return out[torch.from_numpy(inverse.reshape(-1))]


def _as_f32(view: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 tensor on `device` of a (read-only, memory-mapped) float16/32 view: moved in
    its stored precision, converted there; only ever read."""
    with warnings.catch_warnings():  # torch warns that the memmap is read-only; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(view)
    return t.to(device).float()


# ---------------------------------------------------------------------------------------------
# Top-k with deterministic ties


def _lex_top(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of [Q, n] candidates: score descending, row ascending among equal scores."""
    by_row = rows.argsort(dim=1, stable=True)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), rows.gather(1, order)


def _chunk_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [Q, min(k, n)] of the top-k of `scores` [Q, n], ties at the k-th value
    going to the lowest columns (whatever torch.topk picks among ties)."""
    q, n = scores.shape
    if k >= n:
        return torch.arange(n, device=scores.device).expand(q, n)
    vals, idx = scores.topk(k + 1, dim=1)
    idx = idx[:, :k].clone()
    tied = vals[:, k - 1] == vals[:, k]
    if bool(tied.any()):
        t = tied.nonzero().squeeze(1)
        sub, kth = scores[t], vals[t, k - 1:k]
        greater, equal = sub > kth, sub == kth
        need = k - greater.sum(1, keepdim=True)
        chosen = greater | (equal & (equal.cumsum(1) <= need))
        idx[t] = chosen.nonzero()[:, 1].view(len(t), k)
    return idx


# ---------------------------------------------------------------------------------------------
# Indexes


class SearchIndex:
    """A pool of `len(self)` vectors of dimension `dim` searched by inner product."""

    kind: str
    dim: int
    path: Path

    def __len__(self) -> int:
        raise NotImplementedError

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, dim] (the caller L2-normalises) -> (scores [Q, k] float32, descending
        inner products; rows [Q, k] int64), on the CPU. An approximate index that finds fewer
        than k vectors (too small an nprobe) pads with row -1 and score -inf."""
        raise NotImplementedError

    def vectors(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The stored vectors of `rows` (any shape) as float32 [..., dim] from the embedding
        files, or None when the folder has only a (lossy) faiss index."""
        emb = getattr(self, "embeddings", None)
        if emb is None:
            return None
        idx = torch.as_tensor(rows).cpu().numpy().astype(np.int64)
        bad = (idx < 0) | (idx >= len(emb))
        if bad.any():
            raise IndexError(f"row {int(idx[bad].reshape(-1)[0])} is out of range (0..{len(emb) - 1})")
        return emb.gather(idx.reshape(-1)).reshape(*idx.shape, emb.dim)

    def _queries(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        if k > len(self):
            raise InputError(f"k={k} is larger than the pool ({len(self)} vectors in {self.path})")
        q = torch.as_tensor(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries of shape {list(q.shape)}; the index {self.path} holds vectors of dimension {self.dim}")
        q = q.detach().float()
        if not bool(torch.isfinite(q).all()):
            raise InputError("a query vector is not finite (NaN or inf)")
        return q


class ExactIndex(SearchIndex):
    """Exact inner-product top-k over memory-mapped float16 (or float32) npy parts.

    The pool is scanned `chunk_rows` rows at a time, each chunk converted to float32 on
    `device` and multiplied with a block of `query_block` queries; a running top-k is merged
    after each chunk. Ties go to the lower row. A stored vector that is not finite raises
    `IndexFolderError` naming its file and row when the scan reaches it."""

    kind = "exact"

    def __init__(self, embeddings: Embeddings, path: Path, device: str | torch.device = "cpu",
                 chunk_rows: int = CHUNK_ROWS, query_block: int = QUERY_BLOCK):
        self.embeddings, self.path = embeddings, Path(path)
        self.dim, self.device = embeddings.dim, torch.device(device)
        self.chunk_rows, self.query_block = int(chunk_rows), int(query_block)

    def __len__(self) -> int:
        return len(self.embeddings)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q_all = self._queries(queries, k)
        out_s, out_r = [torch.empty(0, k)], [torch.empty(0, k, dtype=torch.int64)]
        for b in range(0, len(q_all), self.query_block):
            q = q_all[b:b + self.query_block].to(self.device)
            best_s = torch.empty(len(q), 0, device=self.device)
            best_r = torch.empty(len(q), 0, dtype=torch.int64, device=self.device)
            for first, _, view in self.embeddings.chunks(self.chunk_rows):
                scores = q @ _as_f32(view, self.device).T
                finite = torch.isfinite(scores[0])  # a stored NaN or inf makes every query's score non-finite
                if not bool(finite.all()):
                    raise self.embeddings.row_error(first + int((~finite).nonzero()[0, 0]))
                cols = _chunk_top(scores, k)
                cand_s = torch.cat([best_s, scores.gather(1, cols)], dim=1)
                cand_r = torch.cat([best_r, cols + first], dim=1)
                best_s, best_r = _lex_top(cand_s, cand_r, k)
            out_s.append(best_s.cpu())
            out_r.append(best_r.cpu())
        return torch.cat(out_s), torch.cat(out_r)


class FaissIndex(SearchIndex):
    """A faiss index (inner product), with the embedding files when the folder has them: a
    lossy index's shortlist of `rerank * k` candidates is then re-scored exactly from them."""

    def __init__(self, index, path: Path, embeddings: Embeddings | None = None, rerank: int | None = None):
        faiss = _faiss()
        self.index, self.path, self.embeddings = index, Path(path), embeddings
        self.dim = int(index.d)
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexIVFPQ):
            self.kind = "faiss-ivfpq"
        elif isinstance(inner, faiss.IndexHNSWFlat):
            self.kind = "faiss-hnsw"
        else:
            self.kind = "faiss"
        exact_codes = isinstance(inner, (faiss.IndexHNSWFlat, faiss.IndexFlat, faiss.IndexIVFFlat))
        self._stores_vectors = isinstance(inner, (faiss.IndexHNSWFlat, faiss.IndexFlat))  # float32, by row
        if rerank is None:
            rerank = 0 if exact_codes or embeddings is None else RERANK
        if rerank and embeddings is None:
            raise IndexFolderError(f"{path}: re-ranking needs the embedding files ({EMB_DIR}/*.npy), which this folder lacks")
        self.rerank = int(rerank)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def vectors(self, rows: torch.Tensor) -> torch.Tensor | None:
        """From the embedding files; without them, from the faiss index when it stores the
        vectors themselves (flat, HNSW-flat); None for a lossy one (IVF-PQ, ...)."""
        if self.embeddings is not None or not self._stores_vectors:
            return super().vectors(rows)
        idx = torch.as_tensor(rows).cpu().numpy().astype(np.int64)
        bad = (idx < 0) | (idx >= len(self))
        if bad.any():
            raise IndexError(f"row {int(idx[bad].reshape(-1)[0])} is out of range (0..{len(self) - 1})")
        flat = self.index.reconstruct_batch(idx.reshape(-1)) if idx.size else np.empty((0, self.dim), np.float32)
        return torch.from_numpy(flat).reshape(*idx.shape, self.dim)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._queries(queries, k).cpu().contiguous().numpy()
        shortlist = min(len(self), k * self.rerank) if self.rerank else k
        dist, ids = self.index.search(q, shortlist)
        rows = torch.from_numpy(ids.astype(np.int64))
        if not self.rerank:
            scores = torch.from_numpy(dist.astype(np.float32))
            return scores.masked_fill(rows < 0, -math.inf), rows
        scores = torch.empty(rows.shape)
        queries = torch.from_numpy(q)
        step = max(1, 2**24 // (shortlist * self.dim))  # queries re-scored at once (their candidates: <= 64 MiB float32)
        for b in range(0, len(rows), step):
            r = rows[b:b + step]
            vecs = self.embeddings.gather(r.clamp(min=0).reshape(-1).numpy(), check=False).view(*r.shape, self.dim)
            s = torch.bmm(vecs, queries[b:b + step, :, None]).squeeze(2)
            bad = ~torch.isfinite(s) & (r >= 0)  # a stored NaN or inf
            if bool(bad.any()):
                raise self.embeddings.row_error(int(r[bad][0]))
            scores[b:b + step] = s.masked_fill(r < 0, -math.inf)
        valid = rows >= 0
        rows = rows.masked_fill(~valid, torch.iinfo(torch.int64).max)  # missing candidates sort last
        scores, rows = _lex_top(scores, rows, k)
        return scores, rows.masked_fill(rows == torch.iinfo(torch.int64).max, -1)


# ---------------------------------------------------------------------------------------------
# Opening


def _npy_parts(folder: Path) -> list[Path]:
    """Every .npy under `folder`, sorted by path as embedding-reader (hence autofaiss) reads them."""
    return [Path(p) for p in sorted(str(p) for p in folder.rglob("*.npy") if p.is_file())]


def _metadata_files(folder: Path) -> list[Path]:
    """clip-retrieval back's order: memory-mappable arrow files when present, else sorted parquet files."""
    arrow = sorted(p for p in folder.rglob("*.arrow") if p.is_file())
    return arrow or sorted(p for p in folder.glob("*.parquet") if p.is_file())


def _fourcc(path: Path) -> bytes:
    """The top-level faiss index type (the file's first 4 bytes): IwPQ IVFPQ, IHNf HNSWFlat, IxPT a transform..."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _read_faiss(path: Path):
    """A faiss file memory-mapped where its type allows (IVF lists, flat codes), or an
    index_combiner folder (populated.index + merged_index.ivfdata) on disk."""
    faiss = _faiss()
    if path.is_dir():
        target, flags = path / "populated.index", [faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY]
    else:
        target = path
        ivf_mmap = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY  # IVF lists memory-mapped (other types: read)
        flat_mmap = getattr(faiss, "IO_FLAG_MMAP_IFC", None)  # faiss >= 1.9: flat codes (HNSW's storage) mapped
        flags = [ivf_mmap, 0]
        if flat_mmap is not None and (_fourcc(target)[:2] == b"IH" or _fourcc(target)[:3] == b"IxF"):  # HNSW, flat (IVF refuses this flag)
            flags.insert(0, flat_mmap | faiss.IO_FLAG_READ_ONLY)
    if not target.is_file():
        raise IndexFolderError(f"{target}: no such faiss index file")
    error = None
    for flag in flags:
        try:
            return faiss.read_index(str(target), flag)
        except RuntimeError as e:  # faiss reports a bad file, and a flag its type refuses, this way
            error = e
    raise IndexFolderError(f"{target}: not a readable faiss index ({_first_line(error).split('Error: ')[-1]})")


def _set_params(index, path: Path, nprobe: int | None, ef_search: int | None) -> None:
    faiss = _faiss()
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            raise InputError(f"{path}: {name} does not apply to this index "
                             f"({type(faiss.downcast_index(index)).__name__})") from None


def open_index(folder: str | os.PathLike, nprobe: int | None = None, ef_search: int | None = None, *,
               exact: bool = False, rerank: int | None = None, device: str | torch.device = "cpu",
               chunk_rows: int = CHUNK_ROWS, verify: bool = False) -> tuple[SearchIndex, Metadata]:
    """Open a pool for search. `folder` is one of:

    - an index folder: `image.index` (a faiss file, or an index_combiner folder) and
      `metadata/`, with or without `img_emb/` (clip-retrieval index / autofaiss, or ours);
    - an embeddings folder: `img_emb/*.npy` and `metadata/` (clip-retrieval inference), or a
      folder of `.npy` parts itself; searched exactly;
    - one `.npy` file of vectors, or one faiss `.index` file.

    Without metadata files the metadata is the row numbers (column "row"). When a folder has
    both a faiss index and embeddings, the faiss index is used unless `exact`. `nprobe`
    (IVF indexes) and `ef_search` (HNSW) override the values stored in the faiss file;
    `rerank` (a lossy faiss index with embeddings: shortlist factor, default 10; 0 turns it
    off). `device` and `chunk_rows` are the exact index's. `verify` reads every stored
    vector now to check it is finite (otherwise the exact scan checks as it goes)."""
    path = Path(folder)
    if not path.exists():
        raise IndexFolderError(f"{path}: no such file or folder")
    faiss_path, npy, meta_files = None, [], []
    if path.is_file():
        if path.suffix == ".npy":
            npy = [path]
        elif path.suffix == ".index":
            faiss_path = path
        else:
            raise IndexFolderError(f"{path}: expected a folder, a .npy file of vectors or a faiss .index file")
    else:
        if (path / IMAGE_INDEX).exists():
            faiss_path = path / IMAGE_INDEX
        emb_dir = path / EMB_DIR
        if emb_dir.is_dir():
            npy = _npy_parts(emb_dir)
            if not npy and faiss_path is None:
                raise IndexFolderError(f"{emb_dir}: no vectors (no .npy files)")
        elif faiss_path is None:
            npy = [p for p in _npy_parts(path) if META_DIR not in p.relative_to(path).parts]
        if (path / META_DIR).is_dir():
            meta_files = _metadata_files(path / META_DIR)
            if not meta_files:
                raise IndexFolderError(f"{path / META_DIR}: no .parquet or .arrow metadata files")
        if faiss_path is None and not npy:
            raise IndexFolderError(f"{path}: no vectors (expected {IMAGE_INDEX}, {EMB_DIR}/*.npy or .npy files)")

    embeddings = Embeddings(npy) if npy else None
    if embeddings is not None and verify:
        for first, _, view in embeddings.chunks(CHUNK_ROWS):
            embeddings.check_finite(first, _as_f32(view, torch.device("cpu")).numpy())
    if faiss_path is not None and not exact:
        index = _read_faiss(faiss_path)
        faiss = _faiss()
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFolderError(f"{faiss_path}: a faiss index of metric {index.metric_type}, not inner product")
        if embeddings is not None and (index.d != embeddings.dim or index.ntotal != len(embeddings)):
            raise IndexFolderError(f"{faiss_path}: {index.ntotal} vectors of dimension {index.d}, but {path / EMB_DIR} "
                                   f"has {len(embeddings)} of dimension {embeddings.dim}")
        if index.ntotal == 0:
            raise IndexFolderError(f"{faiss_path}: no vectors (an empty index)")
        _set_params(index, faiss_path, nprobe, ef_search)
        search: SearchIndex = FaissIndex(index, faiss_path, embeddings, rerank)
    else:
        if embeddings is None:
            raise IndexFolderError(f"{path}: exact search needs the embedding files ({EMB_DIR}/*.npy)")
        if nprobe is not None or ef_search is not None:
            raise InputError(f"{path}: nprobe and ef_search apply to a faiss index; this search is exact")
        search = ExactIndex(embeddings, path, device=device, chunk_rows=chunk_rows)
    metadata = Metadata(meta_files, n_rows=len(search))
    if len(metadata) != len(search):
        raise IndexFolderError(f"{path / META_DIR}: {len(metadata)} metadata rows for {len(search)} vectors")
    return search, metadata


# ---------------------------------------------------------------------------------------------
# Writing


def _normalised_f16(block, first: int) -> np.ndarray:
    v = torch.as_tensor(np.asarray(block) if not isinstance(block, torch.Tensor) else block).detach().cpu().float()
    finite = torch.isfinite(v).all(dim=1)
    if not bool(finite.all()):
        raise InputError(f"vector {first + int((~finite).nonzero()[0, 0])} is not finite (NaN or inf)")
    norm = v.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        raise InputError(f"vector {first + int((norm[:, 0] == 0).nonzero()[0, 0])} is zero: it cannot be L2-normalised")
    return (v / norm).to(torch.float16).numpy()


def _write_part(path: Path, block, first: int) -> tuple[int, int]:
    """One npy part, float16, L2-normalised CHUNK_ROWS rows at a time (no float32 copy of the
    whole block); returns its (rows, dim)."""
    if not isinstance(block, (np.ndarray, torch.Tensor)):
        block = np.asarray(block, dtype=np.float32)
    if block.ndim != 2:
        raise InputError(f"vectors must be [n, dim] blocks, got shape {list(block.shape)}")
    n, dim = int(block.shape[0]), int(block.shape[1])
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for a in range(0, n, CHUNK_ROWS):
        out[a:a + CHUNK_ROWS] = _normalised_f16(block[a:a + CHUNK_ROWS], first + a)
    out.flush()
    del out
    return n, dim


def _parts(vectors, rows_per_part: int) -> Iterable:
    if isinstance(vectors, (np.ndarray, torch.Tensor)):
        for a in range(0, len(vectors), rows_per_part):
            yield vectors[a:a + rows_per_part]
    else:
        yield from vectors


def write_index_folder(folder: str | os.PathLike, vectors, metadata: dict[str, list], kind: str = "exact",
                       **params) -> None:
    """Write a pool in clip-retrieval's layout: `img_emb/img_emb_{i}.npy` (the vectors,
    L2-normalised here, float16), `metadata/metadata_{i}.parquet` (the `metadata` columns, one
    row per vector; a column "row" of row numbers when `metadata` is empty) and, for
    kind "ivfpq" or "hnsw", a faiss `image.index` with `image.json` (see `add_faiss_index`).

    `vectors`: a [N, dim] array or tensor, split into parts of `rows_per_part` rows (default
    10**6, clip-retrieval's), or an iterable of [n_i, dim] blocks, one part each (so a pool
    larger than memory can be streamed). The folder is written beside and renamed into place;
    an existing one is an error unless `overwrite=True`."""
    kind = kind.removeprefix("faiss-")
    if kind not in ("exact", "ivfpq", "hnsw"):
        raise InputError(f"unknown index kind {kind!r} (expected exact, ivfpq or hnsw)")
    folder = Path(folder)
    overwrite = params.pop("overwrite", False)
    rows_per_part = int(params.pop("rows_per_part", ROWS_PER_PART))
    if folder.exists() and not overwrite:
        raise IndexFolderError(f"{folder}: already exists (pass overwrite=True to replace it)")
    allowed = [] if kind == "exact" else [p.name for p in inspect.signature(add_faiss_index).parameters.values()
                                           if p.kind == p.KEYWORD_ONLY]
    unknown = [name for name in params if name not in allowed]
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(unknown)} for kind {kind!r} "
                         f"(known: {', '.join(['overwrite', 'rows_per_part', *allowed])})")
    if kind != "exact":
        _faiss()
    pa = _pyarrow()
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / EMB_DIR).mkdir(parents=True)
        (tmp / META_DIR).mkdir()
        counts, dims = [], set()
        for i, block in enumerate(_parts(vectors, rows_per_part)):
            n_i, dim = _write_part(tmp / EMB_DIR / f"img_emb_{i}.npy", block, sum(counts))
            dims.add(dim)
            if len(dims) > 1:
                raise InputError(f"vector block {i} has dimension {dim}, the first has {(dims - {dim}).pop()}")
            counts.append(n_i)
        n = sum(counts)
        if n == 0:
            raise InputError("no vectors to write")
        columns = dict(metadata) if metadata else {"row": list(range(n))}
        for name, values in columns.items():
            if len(values) != n:
                raise InputError(f"metadata column {name!r} has {len(values)} rows for {n} vectors")
        digits = int(math.log10(len(counts))) + 1  # clip-retrieval's zero-padding of part numbers
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i in range(len(counts)):
            name = str(i).zfill(digits)
            os.replace(tmp / EMB_DIR / f"img_emb_{i}.npy", tmp / EMB_DIR / f"img_emb_{name}.npy")
            try:
                table = pa.table({c: values[offsets[i]:offsets[i + 1]] for c, values in columns.items()})
            except (pa.ArrowException, TypeError) as e:
                raise InputError(f"metadata columns {list(columns)}: not storable in parquet ({_first_line(e)})") from None
            pa.parquet.write_table(table, tmp / META_DIR / f"metadata_{name}.parquet")
        if kind != "exact":
            add_faiss_index(tmp, kind, **params)
            infos = json.loads((tmp / INDEX_INFOS).read_text())
            infos["index_path"] = str((folder / IMAGE_INDEX).resolve())
            (tmp / INDEX_INFOS).write_text(json.dumps(infos))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sample(embeddings: Embeddings, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(embeddings), size=min(size, len(embeddings)), replace=False))
    return embeddings.gather(rows).numpy()


def default_m(dim: int) -> int:
    """PQ sub-quantisers: the divisor of dim nearest dim / 8 (8 dimensions per byte: 96 at 768)."""
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - dim / 8), -m))


def add_faiss_index(folder: str | os.PathLike, kind: str = "ivfpq", *, nlist: int | None = None, m: int | None = None,
                    nbits: int = 8, train_size: int | None = None, nprobe: int | None = None, M: int = 32,
                    ef_construction: int = 64, ef_search: int = 256, seed: int = 0, batch: int = 2**16) -> None:
    """Build `folder/image.index` (and autofaiss' `image.json`) from `folder/img_emb/*.npy`,
    read in batches (float32 per batch only), inner product.

    "ivfpq": IndexIVFPQ with a flat coarse quantiser; nlist (default 4 * sqrt(N)) lists,
    `m` sub-quantisers of `nbits` bits (default: the divisor of dim nearest dim / 8), trained
    on `train_size` sampled vectors (default max(40 * nlist, 2**16), at most N); `nprobe`
    stored in the file (default max(16, nlist // 32): recall@10 0.99 with the re-ranking on the
    1,000,000 x 768 benchmark, docs/performance.md). "hnsw": IndexHNSWFlat with `M` (32)
    neighbours, `ef_construction` (64), and `ef_search` (256: 0.95 on the benchmark) stored in
    the file. `kind` may also be spelled "faiss-ivfpq" / "faiss-hnsw"."""
    kind = kind.removeprefix("faiss-")
    if kind not in ("ivfpq", "hnsw"):
        raise InputError(f"unknown faiss index kind {kind!r} (expected ivfpq or hnsw)")
    faiss = _faiss()
    folder = Path(folder)
    emb = Embeddings(_npy_parts(folder / EMB_DIR))
    n, d = len(emb), emb.dim
    if kind == "ivfpq":
        if n < 2**nbits:
            raise InputError(f"{folder}: IVF-PQ needs at least {2**nbits} vectors to train on, the pool has {n} "
                             "(use the exact or hnsw kind)")
        nlist = int(nlist or max(1, min(round(4 * math.sqrt(n)), n // 39 or 1)))
        m = int(m or default_m(d))
        if d % m:
            raise InputError(f"m={m} does not divide the dimension {d}")
        nprobe = int(nprobe or min(nlist, max(16, nlist // 32)))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.niter = 10
        index.pq.cp.seed = seed
        index.pq.cp.niter = 15
        index.train(_sample(emb, train_size or max(40 * nlist, 2**16), seed))
        index.nprobe = nprobe
        key, param = f"IVF{nlist},PQ{m}x{nbits}", f"nprobe={nprobe}"
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        key, param = f"HNSW{M}", f"efSearch={ef_search}"
    else:
        raise InputError(f"unknown faiss index kind {kind!r} (expected ivfpq or hnsw)")
    for first, _, view in emb.chunks(batch):
        block = _as_f32(view, torch.device("cpu")).numpy()
        emb.check_finite(first, block)
        index.add(block)
    target = folder / IMAGE_INDEX
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, target)
    infos = {"index_key": key, "index_param": param, "index_path": str(target.resolve()),
             "size in bytes": target.stat().st_size, "nb vectors": n, "vectors dimension": d,
             "compression ratio": 4.0 * n * d / target.stat().st_size}
    (folder / INDEX_INFOS).write_text(json.dumps(infos))


# ---------------------------------------------------------------------------------------------


def recall_at_k(approx_rows: torch.Tensor, exact_rows: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (rows -1 count as misses)."""
    a, e = torch.as_tensor(approx_rows)[:, :k], torch.as_tensor(exact_rows)[:, :k]
    if a.shape != e.shape or a.shape[1] != k:
        raise InputError(f"recall@{k} needs two [Q, >={k}] row tensors, got {list(approx_rows.shape)} and {list(exact_rows.shape)}")
    hits = ((a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)).any(dim=2).sum()
    return float(hits) / (a.shape[0] * k)
