"""Large-pool retrieval, a local replacement for the LAION kNN service MindEye 1 used:
`python -m eval.retrieve build ...` makes an index of image embeddings, `python -m eval.retrieve
query ...` searches it with a checkpoint's brain embeddings of its test split.

build: the pool is the concatenation, in this order, of
  --stimuli        every stimulus the checkpoint's subject saw (`image_id` kept, so that hits count),
  --images         image files (a folder, or a text file listing paths),
  --embeddings     precomputed vectors (`.npy` [N, D], or an embeddings folder clip-retrieval wrote);
images are embedded with a CLIP image encoder's final (pooled) embedding: `--clip-weights FILE`
(OpenAI, open_clip or Hugging Face; `--clip-arch`), or the checkpoint's own `clip.*`. Vectors are
L2-normalised. `--kind exact` (float16 vectors, exact search in torch, millions of vectors) or an
approximate faiss index (`ivfpq`, `hnsw`; faiss-cpu is the optional extra `retrieval`). The folder
has clip-retrieval's layout (`img_emb/`, `metadata/`, `image.index`), and one of theirs (or
autofaiss') is queried as it is.

query: the query vector of a test sample is the prior's sampled CLIP image embedding when the
recipe has a prior (as MindEye's LAION query), else its brain embedding (the projector output;
`--query` chooses);
both must be pooled (one token: a `clip.target=pooled` model). The top `--k` pool entries are
kept; the chosen image is the one whose pool vector is most similar to the projector output (as
MindEye kept the best of its downloaded neighbours). Writes topk.json (rows, scores, metadata of
the top k per sample), retrieval.json and table.md (pool, index kind, hit rates when the pool
holds the seen images with their `image_id`, chance), and, when the chosen images are readable
(stimuli of the dataset, local files), chosen/<test id>.png and the image metrics of
`python -m eval` on them (report/).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python eval/retrieve.py` puts eval/ (not the repository) on the path
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import logs  # noqa: E402
from data.cli import run_cli  # noqa: E402
from data.clip_weights import config_weights, read_clip_weights, use_quick_gelu  # noqa: E402
from data.files import atomic_write_text  # noqa: E402
from data.shards import decode_image, encode_png  # noqa: E402
from data.targets import cached_targets, stimuli_at  # noqa: E402
from eval.features import SPECS  # noqa: E402
from eval.images import IMAGE_SUFFIXES  # noqa: E402
from eval.main import options  # noqa: E402
from eval.report import score_checkpoint  # noqa: E402
from eval.retrieval_index import open_index, write_index_folder  # noqa: E402
from models.clip_image import build_clip_image  # noqa: E402
from models.errors import ConfigError, InputError  # noqa: E402
from train import registry  # noqa: E402  (the one use of train/: recipes by name)

KINDS = ("exact", "ivfpq", "hnsw")
STIMULUS = "stimulus:"  # image_path of a dataset stimulus in a pool: "stimulus:<image id>"


class RetrievalError(InputError):
    """Bad retrieval input; the message names the file or option."""


# ------------------------------------------------------------------------------------------ build


def _clip(args, recipe):
    """The pooled CLIP image encoder: --clip-weights, or the checkpoint's `clip.*`."""
    if args.clip_weights:
        weights = read_clip_weights(args.clip_weights, RetrievalError, "--clip-weights")
        quick = use_quick_gelu(weights, "auto", RetrievalError, "--clip-weights")
        try:
            return build_clip_image(args.clip_arch, weights.state, "pooled", quick)
        except ValueError as e:
            raise RetrievalError(f"{args.clip_weights}: {e} (--clip-arch {args.clip_arch})") from None
    if recipe is None or "clip" not in recipe.cfg:
        raise ConfigError("images to embed need --clip-weights FILE, or --checkpoint of a run with a CLIP encoder")
    c = recipe.cfg.clip
    state, quick = config_weights(c.weights, c.activation, ConfigError)
    tiny = dict(c.tiny) if c.get("tiny") else None
    return build_clip_image(c.arch, state, "pooled", quick, c.seed, tiny)


def _image_files(sources: list[Path]) -> list[Path]:
    files = []
    for src in sources:
        if src.is_dir():
            found = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise RetrievalError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif src.is_file():
            listed = [Path(line.strip()) for line in src.read_text().splitlines() if line.strip()]
            missing = [p for p in listed if not p.is_file()]
            if missing:
                raise RetrievalError(f"{src}: lists {missing[0]}, which does not exist")
            files += listed
        else:
            raise RetrievalError(f"{src}: no such folder or list file (--images)")
    return files


@torch.no_grad()
def _embed_files(clip, files: list[Path], batch_size: int, device: torch.device) -> np.ndarray:
    out = []
    for s in tqdm(range(0, len(files), batch_size), desc="embedding images", unit="batch"):
        batch = []
        for path in files[s : s + batch_size]:
            try:
                batch.append(torch.from_numpy(decode_image(path.read_bytes())))
            except Exception as e:  # noqa: BLE001 - any unreadable image is one error line
                raise RetrievalError(f"{path}: unreadable image ({type(e).__name__})") from None
        sizes = {tuple(b.shape) for b in batch}
        if len(sizes) > 1:  # CLIP's preprocessing resizes each; stack them one by one
            vecs = torch.cat([clip(b[None].to(device)) for b in batch])
        else:
            vecs = clip(torch.stack(batch).to(device))
        out.append(vecs[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def _embeddings(sources: list[Path]) -> np.ndarray:
    parts = []
    for src in sources:
        index, _ = open_index(src)
        rows = torch.arange(len(index))
        vectors = index.vectors(rows)
        if vectors is None:
            raise RetrievalError(f"{src}: holds no stored vectors to add to a pool (a faiss index alone)")
        parts.append(vectors.numpy())
    return np.concatenate(parts)


def build(args) -> None:
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out}: not empty; pass --overwrite to replace the index there")
    if not (args.stimuli or args.images or args.embeddings):
        raise ConfigError("give the pool: --stimuli, --images and/or --embeddings")
    device = torch.device(args.device)
    recipe = None
    if args.checkpoint is not None:
        _, recipe = registry.from_checkpoint(args.checkpoint, args.config, args.overrides, device)
    elif args.stimuli:
        raise ConfigError("--stimuli needs --checkpoint (whose subject's stimuli form the pool)")
    files = _image_files(args.images) if args.images else []
    vectors, meta = [], {"image_path": [], "image_id": []}
    if args.stimuli or files:
        clip = _clip(args, recipe).to(device)
    if args.stimuli:
        data = recipe.data
        table = cached_targets(lambda images: clip(images.to(device)).float().cpu(),
                               {"kind": "pool", "clip": str(args.clip_weights or "checkpoint"),
                                "checkpoint": str(args.checkpoint)},
                               data.root, data.manifest, data.subject, data.cache, args.batch_size,
                               "CLIP embeddings of the stimuli")
        vectors.append(np.asarray(table.values, dtype=np.float32).reshape(len(table.ids), -1))
        meta["image_id"] += [int(i) for i in table.ids]
        meta["image_path"] += [f"{STIMULUS}{int(i)}" for i in table.ids]
    if files:
        vectors.append(_embed_files(clip, files, args.batch_size, device))
        meta["image_id"] += [-1] * len(files)
        meta["image_path"] += [str(p.resolve()) for p in files]
    if args.embeddings:
        extra = _embeddings(args.embeddings)
        vectors.append(extra)
        meta["image_id"] += [-1] * len(extra)
        meta["image_path"] += [""] * len(extra)
    dims = {v.shape[1] for v in vectors}
    if len(dims) > 1:
        raise RetrievalError(f"the pool's sources have different widths {sorted(dims)} (another CLIP?)")
    pool = np.concatenate(vectors)
    params = {k: v for k, v in (("nlist", args.nlist), ("m", args.pq_m)) if v}
    write_index_folder(args.out, pool, meta, kind=args.kind, overwrite=args.overwrite, **params)
    print(f"index of {len(pool)} vectors of {pool.shape[1]} ({args.kind}) written to {args.out}")


# ------------------------------------------------------------------------------------------ query


def _pooled(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 3 and x.shape[1] != 1:
        raise ConfigError(f"the checkpoint's {what} are {x.shape[1]} tokens of {x.shape[2]}: large-pool retrieval "
                          "needs a pooled model (clip.target=pooled, e.g. train/configs/mindeye1_pooled_paper.yaml)")
    return F.normalize(x.reshape(len(x), -1).float(), dim=-1)


def _test_embeddings(recipe, query: str) -> dict:
    """The recipe's test embeddings, with the prior's samples when `query` wants them and it can give them."""
    registry.require(recipe, "embeddings", "python -m eval.retrieve query")
    can = getattr(recipe, "diffusion", None) is not None and "prior" in inspect.signature(recipe.embeddings).parameters
    if query == "prior" and not can:
        raise ConfigError("--query prior: the checkpoint has no diffusion prior")
    return recipe.embeddings(recipe.model, "test", **({"prior": True} if can and query != "brain" else {}))


def _hit_rates(top_ids: np.ndarray, own: np.ndarray, ks: list[int]) -> dict[str, float]:
    hits = top_ids == own[:, None]
    return {f"hit@{k}": float(hits[:, :k].any(1).mean() * 100) for k in ks}


def _readable(path: str | None) -> bool:
    return bool(path) and (path.startswith(STIMULUS) or ("://" not in path and Path(path).is_file()))


def _chosen_images(recipe, paths: list[str], out: Path, ids: list[int], size: int = 256) -> None:
    """Write chosen/<test id>.png for every test sample (each path readable)."""
    stimuli = None
    if any(p.startswith(STIMULUS) for p in paths):
        data = recipe.data
        stimuli = cached_targets(stimuli_at(size), {"kind": "images", "size": size}, data.root, data.manifest,
                                 data.subject, data.cache, 64, "stimuli")
    folder = out / "chosen"
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in zip(ids, paths):
        if p.startswith(STIMULUS):
            image = stimuli[[int(p[len(STIMULUS):])]][0].permute(1, 2, 0).numpy()
        else:
            image = decode_image(Path(p).read_bytes())
        (folder / f"{i}.png").write_bytes(encode_png(np.ascontiguousarray(image)))


def query(args) -> None:
    if args.k < 1:
        raise ConfigError(f"--k {args.k}: must be at least 1")
    if (args.out / "retrieval.json").exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: already holds a retrieval report; pass --overwrite to replace it")
    index, meta = open_index(args.index, nprobe=args.nprobe, ef_search=args.ef_search)  # bad index: before any work
    opts = options(args)
    ckpt, recipe = registry.from_checkpoint(args.checkpoint, args.config, args.overrides, opts.device)
    pairs = _test_embeddings(recipe, args.query)
    brain = _pooled(pairs["brain"], "brain embeddings")
    queries = _pooled(pairs["prior"], "prior samples") if "prior" in pairs else brain
    if queries.shape[1] != index.dim:
        raise RetrievalError(f"{args.index}: vectors of {index.dim}, but the checkpoint predicts {queries.shape[1]} "
                             "(build the pool with the checkpoint's CLIP)")
    k = min(args.k, len(index))
    scores, rows = index.search(queries, k)
    paths = meta.column("image_path", rows) if "image_path" in meta.columns else [[None] * k for _ in rows]
    # MindEye kept the best of the neighbours it could download: here, of those with a readable image
    readable = torch.tensor([[_readable(p) for p in r] for r in paths], dtype=torch.bool) & (rows >= 0)
    candidates = index.vectors(rows.clamp_min(0))
    similarity = (torch.einsum("nkd,nd->nk", F.normalize(candidates.float(), dim=-1), brain) if candidates is not None
                  else scores.clone())
    reranked = "projector output" if candidates is not None else "query (the index stores no vectors)"
    similarity[rows < 0] = -torch.inf
    with_images = bool(readable.any(1).all())
    if with_images:
        similarity[~readable] = -torch.inf
    pick = similarity.argmax(1)
    chosen = rows[torch.arange(len(rows)), pick]
    chosen_paths = [r[int(c)] for r, c in zip(paths, pick)]
    ids = pairs["image_ids"].tolist()

    args.out.mkdir(parents=True, exist_ok=True)
    top = [{"image_id": i, "rows": r.tolist(), "scores": [round(float(x), 6) for x in s], "image_path": p,
            "chosen_row": int(c)} for i, r, s, p, c in zip(ids, rows, scores, paths, chosen)]
    atomic_write_text(args.out / "topk.json", json.dumps(top, indent=0))
    report = {"checkpoint": ckpt.source, "index": str(args.index), "index_kind": index.kind, "pool_size": len(index),
              "k": k, "n_test": len(ids), "query": "prior samples" if "prior" in pairs else "brain embeddings",
              "rerank": reranked}
    notes = [f"pool: {args.index} ({len(index)} vectors of {index.dim}, index kind {index.kind})",
             f"query: the checkpoint's {report['query']} of {len(ids)} test samples; top {k} kept; chosen: best of "
             f"them{' with a readable image' if with_images else ''} by cosine similarity to the {reranked}"]
    pool_ids = np.asarray(meta.column("image_id")) if "image_id" in meta.columns else None
    if pool_ids is not None and np.isin(np.asarray(ids), pool_ids).any():
        top_ids = np.where(rows.numpy() >= 0, pool_ids[rows.clamp_min(0).numpy()], -2)
        ks = sorted({1, 5, 10, k} & set(range(1, k + 1)))
        report.update(_hit_rates(top_ids, np.asarray(ids), ks))
        report["chosen_is_seen"] = float((top_ids[np.arange(len(ids)), pick.numpy()] == np.asarray(ids)).mean() * 100)
        report["in_pool"] = float(np.isin(np.asarray(ids), pool_ids).mean() * 100)
        report["chance"] = {f"hit@{kk}": 100 * kk / len(index) for kk in ks}
        notes.append("hit@k: % of test samples whose seen image (by image_id) is among the top k; chance k / pool")
    else:
        notes.append("no hit rates: the pool holds none of the test images (no matching image_id)")
    if with_images:
        _chosen_images(recipe, chosen_paths, args.out, ids)
        caps = registry.capabilities(recipe) | {"generation"}
        metrics = score_checkpoint(recipe, caps, {"checkpoint": ckpt.source, "recipe": ckpt.cfg.recipe},
                                   args.out / "report", args.out / "chosen", opts)
        report["image_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
        notes.append(f"image metrics of the chosen images: {args.out / 'report' / 'table.md'}")
    else:
        notes.append("no image metrics: for some samples none of the top k has a local image (URLs or bare "
                     "embeddings)")
    atomic_write_text(args.out / "retrieval.json", json.dumps(report, indent=1))
    rows_md = [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report.items()
               if not isinstance(v, dict)]
    table = "\n".join(["| key | value |", "| --- | --- |", *rows_md, "", *(f"- {n}" for n in notes)]) + "\n"
    atomic_write_text(args.out / "table.md", table)
    print(table)


# ------------------------------------------------------------------------------------------ CLI


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="an index of image embeddings")
    b.add_argument("--out", type=Path, required=True, help="index folder (clip-retrieval's layout)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b.add_argument("--checkpoint", type=Path, default=None, help="a run whose CLIP (clip.*) embeds the images")
    b.add_argument("--config", type=Path, default=None, help="recipe YAML for a single weights file")
    b.add_argument("--stimuli", action="store_true", help="add every stimulus the checkpoint's subject saw")
    b.add_argument("--images", type=Path, action="append", default=[], help="folder of images, or a list file")
    b.add_argument("--embeddings", type=Path, action="append", default=[],
                   help="precomputed vectors: .npy [N, D], or an embeddings folder (img_emb/*.npy)")
    b.add_argument("--clip-weights", default="", help="local CLIP weights file (default: the checkpoint's clip.*)")
    b.add_argument("--clip-arch", default="ViT-L-14", help="open_clip architecture of --clip-weights")
    b.add_argument("--kind", choices=KINDS, default="exact", help="exact, or an approximate faiss index")
    b.add_argument("--nlist", type=int, default=0, help="ivfpq: inverted lists (default ~4 sqrt(N))")
    b.add_argument("--pq-m", type=int, default=0, help="ivfpq: PQ subquantizers (default: dim / 8)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    q = sub.add_parser("query", help="search an index with a checkpoint's test-split brain embeddings")
    q.add_argument("--checkpoint", type=Path, required=True)
    q.add_argument("--config", type=Path, default=None, help="recipe YAML for a single weights file")
    q.add_argument("--index", type=Path, required=True, help="index folder (ours, clip-retrieval's or autofaiss'), or .npy")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--k", type=int, default=16, help="neighbours kept per sample (MindEye: 16 of 300 downloaded)")
    q.add_argument("--query", choices=("auto", "prior", "brain"), default="auto",
                   help="query vectors: the prior's samples (MindEye's LAION query), the brain embeddings, or auto "
                        "(the prior's when the checkpoint has one)")
    q.add_argument("--nprobe", type=int, default=None, help="ivfpq: lists probed")
    q.add_argument("--ef-search", type=int, default=None, help="hnsw: search breadth")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--batch-size", type=int, default=32, help="images per feature-extractor batch")
    q.add_argument("--extractors", default=",".join(SPECS), help="image metrics' extractors (comma-separated)")
    q.add_argument("--weights", action="append", default=[], metavar="NAME=PATH")
    q.add_argument("--weights-dir", type=Path, action="append", default=None)
    q.add_argument("--resize", default="reference")
    q.add_argument("--ssim-window", default="2d")
    q.add_argument("--n-way-classifier", default="vit_h_14")
    q.add_argument("--random-weights", action="store_true", help="random extractor weights (smoke tests only)")
    q.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs.setup(0)
    return run_cli(lambda: (build if args.command == "build" else query)(args), report=True)


if __name__ == "__main__":
    sys.exit(main())
