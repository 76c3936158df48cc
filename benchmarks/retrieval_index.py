"""Local large-pool retrieval (eval/retrieval_index.py): build time, bytes per vector, search
speed and recall@10 of the exact index and the faiss indexes, on a simulated pool:

    python -m benchmarks.retrieval_index [--n 1000000] [--dim 768] [--queries 1000] [--k 10]
        [--kinds ivfpq,hnsw] [--nprobe 16,32,64] [--ef-search 64,128,512] [--dir SCRATCH] [--out FILE.json]

The pool is --n unit vectors of dimension --dim in float16, seeded (`simulate`): n/100
clusters grouped under 100 topics around a common mean direction, each point its cluster's
centre plus a variation in a 32-dimensional subspace of its cluster's group, a variation along
32 directions shared by all clusters and a little isotropic noise (CLIP embeddings lie in a
cone and have a low intrinsic dimension). At 1,000,000 x 768 two random pool vectors have an
inner product of about 0.30 and a vector's nearest neighbour about 0.69; an IVF of 1000 lists
(flat codes) finds 71% / 95% / 99.9% of the exact top-10 with nprobe 4 / 8 / 16. The queries
are fresh points of the same mixture with more isotropic noise (a brain-predicted embedding
is a noisy estimate of its image's). The mean top-1 and top-k inner products of the exact
search are printed, to compare the neighbourhoods with real data.

Measured, each once, wall-clock (the load average before and after is printed: on a shared
machine others' work slows every figure): the time to write the exact folder (L2
normalisation, float16 npy parts, parquet metadata with an image_path column) and to build
each faiss index at its defaults from that folder (training, adding, writing), the bytes per
vector on disk, queries/s of a batch of --queries queries at k=--k with 1 thread and with
--threads (torch and faiss; default: the usable cores; the fastest of --repeats batches for the
approximate indexes, one batch for the exact one), and recall@k against the exact search
for each --nprobe / --ef-search value and the index's default. IVF-PQ is measured with and
without re-ranking its shortlist (10 k candidates) exactly from the float16 embedding files.
The folders go to a temporary folder under --dir (1.5 GB at the default size), removed at the
end unless --keep; --out writes every figure as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.hardware import describe, label
from eval.retrieval_index import add_faiss_index, open_index, recall_at_k, write_index_folder

TOPICS, GROUPS = 100, 64


def simulate(n: int, dim: int, seed: int, noise: float, n_clusters: int, latent: int = 32, chunk: int = 2**17):
    """float16 unit vectors [n, dim] in blocks of `chunk` rows:

        normalise(m + 0.9 c_j + B_(j mod 64) z + S y + noise e)

    m a mean direction (CLIP embeddings lie in a cone); c_j the centre of cluster j (of
    `n_clusters`), itself a noisy copy of one of 100 topic centres; B_g one of 64 unit bases
    of `latent`-dimensional subspaces, the variation within the clusters of group g; S a
    unit basis of a `latent`-dimensional subspace shared by all clusters (variation along
    common attributes), z ~ N(0, 0.9^2 / latent), y ~ N(0, 0.8^2 / latent); e ~ N(0, I / dim).
    Everything but z, y, e and the cluster of each point depends on the dimension, the cluster
    count and `latent` only, so pool and queries share it."""
    unit = torch.nn.functional.normalize
    fixed = torch.Generator().manual_seed(12345)
    mean = unit(torch.randn(dim, generator=fixed), dim=0)
    topics = unit(torch.randn(TOPICS, dim, generator=fixed), dim=1)
    centres = unit(topics[torch.arange(n_clusters) % TOPICS] + 0.8 * unit(torch.randn(n_clusters, dim, generator=fixed), dim=1), dim=1)
    bases = unit(torch.randn(GROUPS, latent, dim, generator=fixed), dim=2)
    shared = unit(torch.randn(latent, dim, generator=fixed), dim=1)
    g = torch.Generator().manual_seed(seed)
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        cluster = torch.randint(0, n_clusters, (m,), generator=g)
        x = mean + 0.9 * centres[cluster]
        z = torch.randn(m, latent, generator=g) * (0.9 / latent**0.5)
        for group in range(GROUPS):
            rows = (cluster % GROUPS == group).nonzero().squeeze(1)
            x[rows] += z[rows] @ bases[group]
        x += torch.randn(m, latent, generator=g) @ shared * (0.8 / latent**0.5)
        x += torch.randn(m, dim, generator=g) * (noise / dim**0.5)
        yield unit(x, dim=1).half().numpy()


def set_threads(n: int) -> None:
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def folder_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="pool vectors")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", default="ivfpq,hnsw", help="approximate kinds to build (comma-separated; empty: none)")
    p.add_argument("--nprobe", default="16,32,64", help="IVF-PQ nprobe values to search with")
    p.add_argument("--ef-search", default="64,128,512", help="HNSW efSearch values to search with")
    p.add_argument("--repeats", type=int, default=3, help="approximate searches timed this many times (the fastest counts)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="the multi-threaded runs' threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the temporary pool folders go")
    p.add_argument("--keep", action="store_true", help="keep the pool folders")
    p.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    set_threads(args.threads)

    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="retrieval_index_", dir=args.dir))
    load_before = os.getloadavg()
    try:
        rows, stats = measure(args, kinds, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    info = describe()
    info["load_average"] = {"before": load_before[:2], "after": os.getloadavg()[:2]}  # 1 and 5 min: others' work
    print(f"\n{args.n:,} x {args.dim} pool (float16), {args.queries} queries, k={args.k}; {label(info)}; "
          f"exact top-1 / top-{args.k} mean inner product {stats['top1_mean']:.3f} / {stats['topk_mean']:.3f}; "
          f"load average (1 min) {load_before[0]:.1f} before, {info['load_average']['after'][0]:.1f} after\n")
    print(f"| index | search setting | build (s) | bytes/vector | queries/s, 1 thread | queries/s, {args.threads} threads "
          f"| recall@{args.k} |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['setting']} | {r['build_s']:.0f} | {r['bytes_per_vector']:.0f} | {r['qps_1']:.0f} | "
              f"{r['qps_n']:.0f} | {r['recall']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                        "exact_scores": stats, "rows": rows}, indent=1))


def measure(args: argparse.Namespace, kinds: list[str], work: Path) -> tuple[list[dict], dict]:
    clusters = max(1, args.n // 100)
    t = time.perf_counter()
    pool = list(simulate(args.n, args.dim, args.seed, 0.3, clusters))
    queries = torch.from_numpy(np.concatenate(list(simulate(args.queries, args.dim, args.seed + 1, 1.0, clusters)))).float()
    print(f"simulated {args.n} x {args.dim} in {time.perf_counter() - t:.0f} s; writing to {work}", flush=True)
    meta = {"image_path": [f"images/{i:09d}.jpg" for i in range(args.n)]}
    t = time.perf_counter()
    write_index_folder(work / "exact", pool, meta)
    t_write = time.perf_counter() - t
    del pool, meta
    emb_bytes = folder_bytes((work / "exact" / "img_emb").iterdir())
    print(f"exact folder written in {t_write:.1f} s", flush=True)
    thread_counts = sorted({args.threads, 1}, reverse=True)

    def search(index, repeats: int = args.repeats) -> tuple[torch.Tensor, torch.Tensor, dict[int, float]]:
        qps = {}
        for threads in thread_counts:
            set_threads(threads)
            index.search(queries[:8], args.k)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                scores, found = index.search(queries, args.k)
                times.append(time.perf_counter() - t)
            qps[threads] = args.queries / min(times)
        set_threads(args.threads)
        return scores, found, qps

    exact, _ = open_index(work / "exact")
    scores, truth, qps = search(exact, repeats=1)  # tens of seconds each: steadier than the rest
    print(f"exact: {qps[args.threads]:.1f} queries/s ({qps[1]:.1f} on 1 thread)", flush=True)
    stats = {"top1_mean": float(scores[:, 0].mean()), "topk_mean": float(scores[:, args.k - 1].mean())}
    rows = [{"kind": "exact", "setting": "", "build_s": t_write, "bytes_per_vector": emb_bytes / args.n,
             "qps_1": qps[1], "qps_n": qps[args.threads], "recall": 1.0}]

    for kind in kinds:
        folder = work / kind
        folder.mkdir()
        for sub in ("img_emb", "metadata"):  # the same embeddings and metadata, beside this kind's image.index
            (folder / sub).symlink_to(work / "exact" / sub)
        t = time.perf_counter()
        add_faiss_index(folder, kind)
        t_build = time.perf_counter() - t
        index_bytes = (folder / "image.index").stat().st_size
        name, default = json.loads((folder / "image.json").read_text())["index_param"].split("=")
        print(f"{kind}: built in {t_build:.0f} s, {index_bytes / args.n:.0f} bytes/vector, default {name}={default}", flush=True)
        values = sorted({int(v) for v in (args.nprobe if kind == "ivfpq" else args.ef_search).split(",")} | {int(default)})
        for value in values:
            for rerank in ((0, None) if kind == "ivfpq" else (0,)):
                index, _ = open_index(folder, rerank=rerank, **{"nprobe" if kind == "ivfpq" else "ef_search": value})
                setting = (f"{name}={value}{' (default)' if value == int(default) else ''}, "
                           f"{f're-ranked {index.rerank}k' if index.rerank else 'no re-rank'}")
                _, found, qps = search(index)
                recall = recall_at_k(found, truth, args.k)
                print(f"{kind} {setting}: {qps[args.threads]:.0f} queries/s ({qps[1]:.0f} on 1 thread), "
                      f"recall@{args.k} {recall:.3f}", flush=True)
                rows.append({"kind": index.kind, "setting": setting, "build_s": t_build, "bytes_per_vector": index_bytes / args.n,
                             "qps_1": qps[1], "qps_n": qps[args.threads], "recall": recall})
    return rows, stats


if __name__ == "__main__":
    main()
