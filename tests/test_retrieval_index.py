"""eval/retrieval_index.py: the exact top-k against brute force, the recall of the faiss
indexes, clip-retrieval / autofaiss folders opened as they are, and one-line errors."""
from __future__ import annotations

import itertools
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch

from benchmarks.retrieval_index import simulate
from eval.retrieval_index import (
    ExactIndex,
    IndexFolderError,
    default_m,
    open_index,
    recall_at_k,
    write_index_folder,
)
from models.errors import InputError


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def save_parts(folder, parts) -> torch.Tensor:
    """clip-retrieval inference's embedding files: img_emb/img_emb_{i}.npy, float16, zero-padded
    part numbers; returns the float32 matrix of the stored vectors, in row order."""
    (folder / "img_emb").mkdir(parents=True)
    digits = int(math.log10(len(parts))) + 1
    for i, part in enumerate(parts):
        np.save(folder / "img_emb" / f"img_emb_{str(i).zfill(digits)}.npy", part.half().numpy())
    return torch.cat([p.half().float() for p in parts])


def brute_force(queries: torch.Tensor, pool: torch.Tensor, k: int):
    """Top-k of the full float32 score matrix: score descending, the lower row first among ties."""
    scores = queries @ pool.T
    order = scores.sort(dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def clustered(n: int, dim: int, seed: int, noise: float = 0.3, n_clusters: int = 1000) -> torch.Tensor:
    """Unit vectors resembling embeddings: benchmarks/retrieval_index.py's mixture (clusters under
    topics around a common direction, variation in low-dimensional subspaces), with an 8-dimensional
    latent and the isotropic noise per dimension of its 768-dimensional pool (noise 0.3) or queries (1.0)."""
    blocks = simulate(n, dim, seed, noise * (dim / 768) ** 0.5, n_clusters, latent=8)
    return torch.from_numpy(np.concatenate(list(blocks))).float()


# ---------------------------------------------------------------------------------------------
# 1. exact search


def test_exact_top_k_equals_brute_force_across_parts_and_chunks(tmp_path):
    """Parts of 700, 1, 0, 1300 and 999 rows scanned in chunks of 256: no part a multiple of
    the chunk, a one-row part, k = 50 larger than several chunks' remainders."""
    g = torch.Generator().manual_seed(0)
    sizes = [700, 1, 0, 1300, 999]
    pool = save_parts(tmp_path, [unit(torch.randn(n, 24, generator=g)) if n else torch.empty(0, 24) for n in sizes])
    index, metadata = open_index(tmp_path, chunk_rows=256)
    assert isinstance(index, ExactIndex) and index.kind == "exact" and len(index) == len(pool) == 3000
    assert metadata.columns == ["row"] and len(metadata) == 3000
    queries = unit(torch.randn(20, 24, generator=g))
    for k in (1, 50):
        scores, rows = index.search(queries, k)
        ref_scores, ref_rows = brute_force(queries, pool, k)
        assert rows.dtype == torch.int64 and scores.dtype == torch.float32 and rows.shape == (20, k)
        assert torch.equal(rows, ref_rows)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(scores, (queries @ pool.T).topk(k, dim=1).values, rtol=0, atol=1e-6)
    assert index.search(queries, len(pool))[1].sort(dim=1).values.equal(torch.arange(len(pool)).expand(20, -1))
    # the stored vectors, read back from the parts by row (any shape)
    assert torch.equal(index.vectors(rows[:3]), pool[rows[:3]])
    assert metadata.column("row", rows[:2, :3]) == rows[:2, :3].tolist()


def test_exact_ties_go_to_the_lower_row(tmp_path):
    """Vectors with four entries of 0.5 (exact in float16) and queries of zeros and ones: every
    score is one of 0, 0.5, ..., 2, exact whatever the summation order, so hundreds of rows share
    each score, and the k-th best is tied with rows beyond it (torch.topk picks any of those)."""
    g = torch.Generator().manual_seed(1)
    dim, n = 12, 3000
    pool = torch.zeros(n, dim)
    for i in range(n):
        pool[i, torch.randperm(dim, generator=g)[:4]] = 0.5
    queries = torch.randint(0, 2, (16, dim), generator=g).float()
    save_parts(tmp_path, [pool[:1000], pool[1000:1001], pool[1001:]])
    for chunk in (128, 1000):
        index, _ = open_index(tmp_path, chunk_rows=chunk)
        for k in (7, 300):
            scores, rows = index.search(queries, k)
            ref_scores, ref_rows = brute_force(queries, pool, k)
            assert torch.equal(scores, ref_scores) and torch.equal(rows, ref_rows)
            assert bool(((queries @ pool.T) == scores[:, -1:]).sum(1).gt(k).all())  # ties beyond the k-th
            ties = scores[:, 1:] == scores[:, :-1]
            assert bool((rows[:, 1:] > rows[:, :-1])[ties].all())


def test_written_folder_is_normalised_float16_in_clip_retrievals_layout(tmp_path):
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(25, 8, generator=g) * 3
    write_index_folder(tmp_path / "pool", vectors, {"caption": [f"c{i}" for i in range(25)]}, rows_per_part=10)
    names = sorted(p.relative_to(tmp_path / "pool").as_posix() for p in (tmp_path / "pool").rglob("*") if p.is_file())
    assert names == ["img_emb/img_emb_0.npy", "img_emb/img_emb_1.npy", "img_emb/img_emb_2.npy",
                     "metadata/metadata_0.parquet", "metadata/metadata_1.parquet", "metadata/metadata_2.parquet"]
    stored = [np.load(tmp_path / "pool" / "img_emb" / f"img_emb_{i}.npy") for i in range(3)]
    assert [s.dtype for s in stored] == [np.float16] * 3 and [len(s) for s in stored] == [10, 10, 5]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(stored)).float(), unit(vectors), rtol=0, atol=1e-3)
    index, metadata = open_index(tmp_path / "pool")
    assert index.kind == "exact" and metadata.column("caption")[10:12] == ["c10", "c11"]
    with pytest.raises(IndexFolderError, match="already exists"):
        write_index_folder(tmp_path / "pool", vectors, {})


# ---------------------------------------------------------------------------------------------
# 2. approximate search


@pytest.fixture(scope="module")
def pool_100k(tmp_path_factory):
    """IVF-PQ on 100,000 clustered vectors of dimension 48: nlist 4 sqrt(N) = 1265 (the
    default), 24 sub-quantisers (2 dimensions each; the default, dim / 8, suits 768) and nprobe
    160, found by a sweep: at 48 dimensions this pool needs many more lists probed than the
    768-dimensional benchmark."""
    pytest.importorskip("faiss")
    folder = tmp_path_factory.mktemp("pool") / "ivfpq"
    pool, queries = clustered(100_000, 48, seed=0), clustered(300, 48, seed=1, noise=1.0)
    write_index_folder(folder, pool, {}, kind="ivfpq", m=24, nprobe=160, train_size=20_000)
    exact, _ = open_index(folder, exact=True)
    return folder, queries, exact.search(queries, 10)


def test_ivfpq_recall_at_10_against_exact(pool_100k):
    folder, queries, (_, exact_rows) = pool_100k
    infos = json.loads((folder / "image.json").read_text())
    assert infos["index_key"] == "IVF1265,PQ24x8" and infos["index_param"] == "nprobe=160"
    index, _ = open_index(folder)
    assert index.kind == "faiss-ivfpq" and index.rerank == 10 and len(index) == 100_000
    scores, rows = index.search(queries, 10)
    assert recall_at_k(rows, exact_rows) >= 0.95
    # re-ranked scores are the exact ones of the rows found
    torch.testing.assert_close(scores, (queries[:, None, :] * index.vectors(rows)).sum(-1), rtol=0, atol=1e-5)
    # product quantisation alone falls short (the shortlist's re-ranking matters), so does a small nprobe
    assert recall_at_k(open_index(folder, rerank=0)[0].search(queries, 10)[1], exact_rows) < 0.95
    assert recall_at_k(open_index(folder, nprobe=8)[0].search(queries, 10)[1], exact_rows) < 0.95


def test_hnsw_recall_at_10_against_exact(tmp_path):
    pytest.importorskip("faiss")
    pool, queries = clustered(20_000, 48, seed=2), clustered(300, 48, seed=3, noise=1.0)
    write_index_folder(tmp_path / "hnsw", pool, {}, kind="hnsw")
    index, _ = open_index(tmp_path / "hnsw")
    assert index.kind == "faiss-hnsw" and index.rerank == 0
    exact_rows = open_index(tmp_path / "hnsw", exact=True)[0].search(queries, 10)[1]
    assert recall_at_k(index.search(queries, 10)[1], exact_rows) >= 0.95
    assert recall_at_k(open_index(tmp_path / "hnsw", ef_search=1)[0].search(queries, 10)[1], exact_rows) < 0.95


def test_recall_at_k():
    exact = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(torch.tensor([[3, 2, 9], [-1, 4, 6]]), exact, k=3) == pytest.approx(4 / 6)
    assert default_m(768) == 96 and default_m(48) == 6 and default_m(32) == 4


# ---------------------------------------------------------------------------------------------
# 3. folders of clip-retrieval and autofaiss


def clip_retrieval_folders(tmp_path, n: int = 2400, dim: int = 32, parts: int = 12):
    """What `clip-retrieval inference` writes (emb/: img_emb/img_emb_{ii}.npy float16 and
    metadata/metadata_{ii}.parquet per partition, part numbers zero-padded) and what
    `clip-retrieval index` then writes (index/: image.index built by autofaiss, its infos
    image.json, and a copy of metadata/)."""
    faiss = pytest.importorskip("faiss")
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    vectors = clustered(n, dim, seed=4)
    bounds = list(itertools.pairwise(np.linspace(0, n, parts + 1).astype(int)))
    save_parts(tmp_path / "emb", [vectors[a:b] for a, b in bounds])
    (tmp_path / "emb" / "metadata").mkdir()
    for i, (a, b) in enumerate(bounds):
        pq.write_table(pa.table({"image_path": [f"{r:05d}.jpg" for r in range(a, b)],
                                 "caption": [f"caption {r}" for r in range(a, b)],
                                 "similarity": [0.3] * (b - a)}), tmp_path / "emb" / "metadata" / f"metadata_{i:02d}.parquet")
    stored = torch.from_numpy(np.concatenate([np.load(p) for p in sorted((tmp_path / "emb" / "img_emb").glob("*.npy"))]))
    (tmp_path / "index").mkdir()
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)  # autofaiss' choice for a small pool: HNSW32
    index.add(stored.float().numpy())
    faiss.write_index(index, str(tmp_path / "index" / "image.index"))
    (tmp_path / "index" / "image.json").write_text(json.dumps({"index_key": "HNSW32", "index_param": "efSearch=64"}))
    shutil.copytree(tmp_path / "emb" / "metadata", tmp_path / "index" / "metadata")
    return stored.float()


def test_clip_retrieval_and_autofaiss_folders_open_as_they_are(tmp_path):
    pool = clip_retrieval_folders(tmp_path)
    queries = pool[[0, 5, 199, 200, 2399]]
    emb, emb_meta = open_index(tmp_path / "emb")
    index, meta = open_index(tmp_path / "index")
    assert emb.kind == "exact" and index.kind == "faiss-hnsw" and len(index) == len(emb) == len(meta) == 2400
    assert meta.columns == ["image_path", "caption", "similarity"]
    # without the embeddings, the vectors come from an index that stores them (HNSW-flat), else None
    assert torch.equal(index.vectors(torch.tensor([[0, 7]])), pool[torch.tensor([[0, 7]])])
    for searched, metadata in ((emb, emb_meta), (index, meta)):
        _, rows = searched.search(queries, 5)
        assert rows[:, 0].tolist() == [0, 5, 199, 200, 2399]  # each pool vector finds itself
        assert metadata.column("image_path", rows[:, 0]) == ["00000.jpg", "00005.jpg", "00199.jpg", "00200.jpg", "02399.jpg"]
        assert metadata.column("caption", rows[:, 1:2]) == [[f"caption {r}"] for r in rows[:, 1].tolist()]
    assert emb.search(queries, 5)[1].equal(index.search(queries, 5)[1])


def test_an_autofaiss_ivfpq_index_an_index_combiner_folder_and_arrow_metadata(tmp_path):
    faiss = pytest.importorskip("faiss")
    from faiss.contrib.ondisk import merge_ondisk

    pa = pytest.importorskip("pyarrow")
    pool = clip_retrieval_folders(tmp_path)
    queries = pool[[3, 1500]]
    # autofaiss' IVF-PQ with an OPQ rotation (a user's file of another type): searched as is,
    # and re-ranked from the float16 files once they sit beside it
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(32), 32, 16, 8, 8, faiss.METRIC_INNER_PRODUCT)
    rotation = faiss.OPQMatrix(32, 8, 32)
    rotation.niter = 4
    opq = faiss.IndexPreTransform(rotation, ivfpq)  # as autofaiss' index_factory builds "OPQ8_32,IVF16,PQ8"
    opq.train(pool.numpy())
    opq.add(pool.numpy())
    faiss.ParameterSpace().set_index_parameter(opq, "nprobe", 16)
    faiss.write_index(opq, str(tmp_path / "index" / "image.index"))
    index, _ = open_index(tmp_path / "index")
    assert index.kind == "faiss" and index.rerank == 0 and index.search(queries, 3)[1].shape == (2, 3)
    assert index.vectors(torch.tensor([3])) is None
    shutil.copytree(tmp_path / "emb" / "img_emb", tmp_path / "index" / "img_emb")
    index, _ = open_index(tmp_path / "index")
    assert index.rerank == 10 and index.search(queries, 3)[1][:, 0].tolist() == [3, 1500]
    # clip-retrieval's index_combiner: image.index/ holds populated.index + merged_index.ivfdata;
    # parquet_to_arrow: metadata/*.arrow
    laion = tmp_path / "laion"
    (laion / "image.index").mkdir(parents=True)
    (laion / "metadata").mkdir()
    ivf = faiss.index_factory(32, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(pool.numpy())
    blocks = []
    for b, (a, z) in enumerate(((0, 1000), (1000, 2400))):
        block = faiss.clone_index(ivf)
        block.add_with_ids(pool[a:z].numpy(), np.arange(a, z))
        blocks.append(str(tmp_path / f"block_{b}.index"))
        faiss.write_index(block, blocks[-1])
    merge_ondisk(ivf, blocks, str(laion / "image.index" / "merged_index.ivfdata"))
    ivf.nprobe = 16
    faiss.write_index(ivf, str(laion / "image.index" / "populated.index"))
    table = pa.table({"url": [f"http://x/{r}" for r in range(2400)], "caption": [str(r) for r in range(2400)]})
    with pa.OSFile(str(laion / "metadata" / "0.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    index, meta = open_index(laion)
    assert index.kind == "faiss" and len(index) == len(meta) == 2400
    _, rows = index.search(queries, 3)
    assert rows[:, 0].tolist() == [3, 1500] and meta.column("url", rows[:, 0]) == ["http://x/3", "http://x/1500"]


def test_our_folder_is_theirs(tmp_path):
    """What clip-retrieval's back-end and autofaiss read from our folder: image.index (memory-mapped
    as clip back does), image.json's index_key / index_param, the rows of metadata/*.parquet in
    sorted file order, img_emb/*.npy in sorted path order (embedding-reader)."""
    faiss = pytest.importorskip("faiss")
    pq = pytest.importorskip("pyarrow.parquet")
    pool = clustered(3000, 16, seed=5)
    write_index_folder(tmp_path / "ours", pool, {"image_path": [f"{i}.jpg" for i in range(3000)]}, kind="ivfpq",
                       rows_per_part=1000)
    folder = tmp_path / "ours"
    assert sorted(p.name for p in folder.iterdir()) == ["image.index", "image.json", "img_emb", "metadata"]
    infos = json.loads((folder / "image.json").read_text())
    assert infos["index_key"] == "IVF76,PQ2x8" and infos["index_param"] == "nprobe=16"
    assert infos["index_path"] == str((folder / "image.index").resolve())
    index = faiss.read_index(str(folder / "image.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    assert index.ntotal == 3000 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    paths = [r for p in sorted((folder / "metadata").glob("*.parquet")) for r in pq.read_table(p).column("image_path").to_pylist()]
    assert paths == [f"{i}.jpg" for i in range(3000)]
    stored = np.concatenate([np.load(p) for p in sorted(str(p) for p in (folder / "img_emb").rglob("*.npy"))])
    assert stored.dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(stored).float(), pool, rtol=0, atol=1e-3)
    # the faiss ids are the npy rows: the shortlist re-ranked from img_emb/ finds each vector itself
    assert open_index(folder)[0].search(pool[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# 4. errors


def one_line_error(path, match, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        open_index(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, InputError) and "\n" not in message and match in message, message
    return message


def test_bad_folders_are_one_line_errors_naming_the_file(tmp_path):
    one_line_error(tmp_path / "nowhere", "nowhere: no such file or folder")
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "empty: no vectors")
    (tmp_path / "empty" / "img_emb").mkdir()
    one_line_error(tmp_path / "empty", "img_emb: no vectors")

    g = torch.Generator().manual_seed(6)
    save_parts(tmp_path / "dims", [unit(torch.randn(4, 8, generator=g))])
    np.save(tmp_path / "dims" / "img_emb" / "img_emb_1.npy", np.zeros((3, 9), np.float16))
    one_line_error(tmp_path / "dims", "img_emb_1.npy: vectors of dimension 9, but")

    save_parts(tmp_path / "cut", [unit(torch.randn(40, 8, generator=g))])
    data = (tmp_path / "cut" / "img_emb" / "img_emb_0.npy").read_bytes()
    (tmp_path / "cut" / "img_emb" / "img_emb_0.npy").write_bytes(data[:-100])
    one_line_error(tmp_path / "cut", "img_emb_0.npy: not a readable .npy file")
    np.save(tmp_path / "cut" / "img_emb" / "img_emb_0.npy", np.zeros((2, 3, 4), np.float16))
    one_line_error(tmp_path / "cut", "img_emb_0.npy: expected a float16 or float32 [n, dim] array")

    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    save_parts(tmp_path / "meta", [unit(torch.randn(10, 8, generator=g))])
    (tmp_path / "meta" / "metadata").mkdir()
    one_line_error(tmp_path / "meta", "metadata: no .parquet or .arrow metadata files")
    pq.write_table(pa.table({"caption": ["x"] * 9}), tmp_path / "meta" / "metadata" / "metadata_0.parquet")
    one_line_error(tmp_path / "meta", "metadata: 9 metadata rows for 10 vectors")
    (tmp_path / "meta" / "metadata" / "metadata_0.parquet").write_bytes(b"not parquet")
    one_line_error(tmp_path / "meta", "metadata_0.parquet: not a readable parquet metadata file")

    one_line_error(tmp_path / "meta" / "img_emb" / "img_emb_0.npy", "nprobe and ef_search apply to a faiss index", nprobe=4)


def test_a_nan_vector_is_an_error_naming_its_file_and_row(tmp_path):
    g = torch.Generator().manual_seed(7)
    save_parts(tmp_path / "nan", [unit(torch.randn(300, 8, generator=g)), unit(torch.randn(300, 8, generator=g))])
    part = tmp_path / "nan" / "img_emb" / "img_emb_1.npy"
    stored = np.load(part)
    stored[123, 4] = np.nan
    np.save(part, stored)
    message = one_line_error(tmp_path / "nan", "img_emb_1.npy: row 123 is not finite", verify=True)
    assert str(part) in message
    index, _ = open_index(tmp_path / "nan", chunk_rows=100)  # found by the scan otherwise
    with pytest.raises(IndexFolderError, match="img_emb_1.npy: row 123 is not finite"):
        index.search(unit(torch.randn(2, 8, generator=g)), 5)
    with pytest.raises(InputError, match="vector 3 is not finite"):
        write_index_folder(tmp_path / "w", torch.tensor([[1.0, 0]] * 3 + [[math.nan, 0]]), {})
    with pytest.raises(InputError, match="vector 1 is zero"):
        write_index_folder(tmp_path / "w", torch.tensor([[1.0, 0], [0, 0]]), {})
    with pytest.raises(InputError, match="metadata column 'caption' has 1 rows for 2 vectors"):
        write_index_folder(tmp_path / "w", torch.tensor([[1.0, 0], [0, 1]]), {"caption": ["a"]})
    assert not (tmp_path / "w").exists()


def test_faiss_index_errors(tmp_path):
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(8)
    pool = unit(torch.randn(50, 8, generator=g))
    save_parts(tmp_path / "f", [pool])
    index = faiss.IndexFlatIP(8)
    index.add(pool[:40].numpy())
    faiss.write_index(index, str(tmp_path / "f" / "image.index"))
    one_line_error(tmp_path / "f", "image.index: 40 vectors of dimension 8, but")
    (tmp_path / "f" / "image.index").write_bytes(b"IwPQ garbage")
    one_line_error(tmp_path / "f", "image.index: not a readable faiss index")
    opened, _ = open_index(tmp_path / "f", exact=True)  # the embeddings alone still search
    assert len(opened) == 50
    l2 = faiss.IndexFlatL2(8)
    l2.add(pool.numpy())
    faiss.write_index(l2, str(tmp_path / "f" / "image.index"))
    one_line_error(tmp_path / "f", "not inner product")
    index = faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT)
    index.add(pool.numpy())
    faiss.write_index(index, str(tmp_path / "f" / "image.index"))
    one_line_error(tmp_path / "f", "image.index: nprobe does not apply to this index (IndexHNSWFlat)", nprobe=8)
    searched, _ = open_index(tmp_path / "f")
    with pytest.raises(InputError, match="dimension 8"):
        searched.search(torch.zeros(2, 9), 3)
    with pytest.raises(InputError, match="k=51 is larger than the pool"):
        searched.search(pool[:2], 51)


def test_without_faiss_the_error_names_the_extra(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(9)
    save_parts(tmp_path / "f", [unit(torch.randn(5, 8, generator=g))])
    (tmp_path / "f" / "image.index").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    one_line_error(tmp_path / "f", "pip install 'fmridecode[retrieval]'")
    assert len(open_index(tmp_path / "f", exact=True)[0]) == 5  # the exact index needs no faiss


def test_metadata_columns(tmp_path):
    """Rows by any shape of row numbers (-1, an approximate search's missing result, is None);
    parts with different columns (clip-retrieval's json-normalised extra metadata) give their
    union; a missing column is a KeyError naming it."""
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    write_index_folder(tmp_path / "p", torch.eye(3).repeat(2, 1), {"caption": list("abcdef")}, rows_per_part=3)
    pq.write_table(pa.table({"caption": list("def"), "width": [4, 5, 6]}), tmp_path / "p" / "metadata" / "metadata_1.parquet")
    _, metadata = open_index(tmp_path / "p")
    assert metadata.columns == ["caption", "width"] and len(metadata) == 6
    assert metadata.column("caption", [5, -1, 0]) == ["f", None, "a"]
    assert metadata.column("width") == [None, None, None, 4, 5, 6]
    assert metadata.column("width", torch.tensor([[3, 0], [5, 4]])) == [[4, None], [6, 5]]
    with pytest.raises(KeyError, match="no metadata column 'url'"):
        metadata.column("url")
