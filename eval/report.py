"""A report on one checkpoint, from a recipe holding its weights and the capabilities the
recipe declares: its own test scores (retrieval for an embedding decoder, per-subject mAP /
AUC / Hamming for a label decoder, ...), the retrieval figure, and, given reconstructions,
every image metric; written as results.json, table.md (the reference's column order,
beside the published numbers) and PNG figures. Nothing here imports train/: the eval CLI
(eval/main.py) builds the recipe through the registry and passes it in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from data.files import atomic_write_text
from data.shards import DataError
from eval import metrics
from eval.features import SPECS, build_extractor, extract, locate_weights
from eval.figures import reconstructions_figure, retrievals_figure
from eval.images import load_reconstructions, split_images
from models import scores as scores_lib
from models.errors import ConfigError

# (result key, column title, higher is better), in the reference's column order.
COLUMNS = [
    ("pixcorr", "PixCorr", True), ("ssim", "SSIM", True), ("alexnet2", "Alex(2)", True),
    ("alexnet5", "Alex(5)", True), ("inception", "Incep", True), ("clip", "CLIP", True),
    ("effnet", "EffNet-B", False), ("swav", "SwAV", False),
    ("forward_top1", "Image retrieval", True), ("backward_top1", "Brain retrieval", True),
]
_KEYS = [c[0] for c in COLUMNS]
# Published numbers; retrieval is 300-way top-1. The 4-subject means (subjects 1, 2, 5, 7) are
# those of MindEye 2's paper, where MindEye 1, Brain-Diffuser and Takagi were rescored with
# MindEye's metric code; REPORTED_SOURCES names each row's table.
REPORTED = {
    "MindEye 1, subject 1": dict(zip(_KEYS, (.392, .347, 97.4, 98.7, 94.5, 94.3, .635, .358, 97.2, 94.7))),
    "MindEye 2 (40 sessions), subject 1": dict(zip(_KEYS, (.374, .439, 97.82, 99.10, 96.15, 93.56, .609, .338, 99.96, 99.87))),
    "MindEye 2, 4-subject mean": dict(zip(_KEYS, (.322, .431, 96.1, 98.6, 95.4, 93.0, .619, .344, 98.8, 98.3))),
    "MindEye 2 (1 session), subject 1": dict(zip(_KEYS, (.235, .428, 88.0, 93.3, 83.6, 80.8, .798, .459, 94.0, 77.6))),
    "MindEye 2 (1 session), 4-subject mean": dict(zip(_KEYS, (.195, .419, 84.2, 90.6, 81.2, 79.2, .810, .468, 79.0, 57.4))),
    "MindEye 1, 4-subject mean": dict(zip(_KEYS, (.319, .360, 92.8, 96.9, 94.6, 93.3, .648, .377, 90.0, 84.1))),
    "Brain-Diffuser, 4-subject mean": dict(zip(_KEYS, (.273, .365, 94.4, 96.6, 91.3, 90.9, .728, .421, 18.8, 26.3))),
    "Takagi & Nishimoto, 4-subject mean": dict(zip(_KEYS, (.246, .410, 78.9, 85.6, 83.8, 82.1, .811, .504))),
}
REPORTED_SOURCES = [
    "MindEye 1, subject 1: MindEye 1's paper (Scotti et al. 2023), computed with its `Reconstruction_Metrics` code",
    "MindEye 2 (40 sessions and 1 session), subject 1: the per-subject tables of MindEye 2's paper (arXiv 2403.11207v2)",
    "4-subject means (subjects 1, 2, 5, 7; MindEye 2's 1-session row: fine-tuned on one session of each subject "
    "after pretraining on the other 7): MindEye 2's paper (arXiv 2403.11207v2), all rows scored with MindEye's metric code "
    "(Takagi & Nishimoto without retrieval); Brain-Diffuser's and Takagi's own papers used other protocols",
]
TWO_WAY = ("alexnet2", "alexnet5", "inception", "clip")
DISTANCE = ("effnet", "swav")


N_WAY_CLASSIFIERS = {"vit_h_14": "vit_h_14_logits", "inception": "inception_logits"}  # extractor -> its logits


@dataclass
class ImageMetricOptions:
    extractors: tuple[str, ...] = tuple(SPECS)
    weights: dict[str, str] = field(default_factory=dict)  # extractor -> file; "random" for tests
    search: list[Path] | None = None  # folders holding default-named weight files
    device: torch.device = torch.device("cpu")
    batch_size: int = 32
    resize: str = "reference"  # eval/resize.py: "reference" (MindEye's tables) or "antialias"
    ssim_window: str = "2d"  # metrics.ssim: "2d" (MindEye's tables) or "columns" (Brain-Diffuser's own table)
    n_way: int = 50  # MinD-Vis' n-way top-1 ...
    n_way_trials: int = 1000
    n_way_classifier: str = "vit_h_14"  # ... from this extractor's ImageNet softmax (MinD-Vis': ViT-H/14)


def nway_key(classifier: str, n_way: int) -> str:
    return f"{classifier}_{n_way}way_top1"


def load_extractors(opts: ImageMetricOptions) -> dict[str, nn.Module]:
    """Every requested extractor, after checking that all weight files exist (before any work)."""
    paths = {n: "random" if opts.weights.get(n) == "random" else locate_weights(n, opts.weights.get(n), opts.search)
             for n in opts.extractors}
    return {n: build_extractor(n, p) for n, p in paths.items()}


def image_metrics(truth: torch.Tensor, recons: torch.Tensor, extractors: dict[str, nn.Module],
                  opts: ImageMetricOptions) -> dict[str, float]:
    """Every image metric for reconstructions [N, 3, 256, 256] (or [N, G, ...]) of `truth`.

    Each extractor runs once over the seen images and once over the reconstructions.
    """
    d = opts.device
    out = {"pixcorr": metrics.pixcorr(truth.to(d), recons.to(d), convention=opts.resize),
           "ssim": metrics.ssim(truth.to(d), recons.to(d), convention=opts.resize, window=opts.ssim_window)}
    real = extract(truth, extractors, d, opts.batch_size, "features of seen images", opts.resize)
    flat = recons.flatten(0, 1) if recons.dim() == 5 else recons
    fake_flat = extract(flat, extractors, d, opts.batch_size, "features of reconstructions", opts.resize)
    fake = {k: v.view(*recons.shape[:-3], *v.shape[1:]) for k, v in fake_flat.items()}
    for key in TWO_WAY:
        if key in real:
            out[key] = scores_lib.two_way_identification(real[key].to(d), fake[key].to(d))
    for key in DISTANCE:
        if key in real:
            out[key] = metrics.correlation_distance(real[key].to(d), fake[key].to(d))
    if "inception" in real:
        out["fid"] = metrics.fid(real["inception"].flatten(1), fake_flat["inception"].flatten(1))
    logits = N_WAY_CLASSIFIERS[opts.n_way_classifier]
    if logits in real:
        top1 = metrics.n_way_top1(real[logits].softmax(-1), fake[logits].softmax(-1), opts.n_way, opts.n_way_trials)
        key = nway_key(opts.n_way_classifier, opts.n_way)
        out[key], out[f"{key}_best"] = top1["mean"], top1["best"]
    return out


def convention_notes(opts: ImageMetricOptions, results: dict) -> list[str]:
    """The table notes that say which reference convention each image metric followed."""
    if opts.resize == "reference":
        resize = ("images resized without antialiasing, as MindEye's metric code (torchvision 0.15 `transforms.Resize` "
                  "on float tensors), the convention of the published rows")
    else:
        resize = "images resized WITH antialiasing (--resize antialias): not the published rows' convention"
    ssim = ("SSIM on the 2-D grayscale images (MindEye's tables)" if opts.ssim_window == "2d" else
            "SSIM as 1-D SSIMs down the pixel columns (--ssim-window columns: Brain-Diffuser's own table, not the rows here)")
    notes = [resize, ssim]
    if results["n_generations"] > 1:
        notes.append(f"{results['n_generations']} generations per image: two-way identification by Takagi & Nishimoto's "
                     "protocol (r averaged over the generations, each seen image against the other reconstructions); "
                     "PixCorr, SSIM and the distances average over all pairs")
    key = nway_key(opts.n_way_classifier, opts.n_way)
    if key in results:
        notes.append(f"{opts.n_way}-way top-1 ({SPECS[opts.n_way_classifier].title} ImageNet classifier, "
                     f"{opts.n_way_trials} trials, MinD-Vis' protocol): {results[key]:.2f}% (mean over generations), "
                     f"{results[key + '_best']:.2f}% (best generation)")
    else:
        notes.append(f"no {opts.n_way}-way top-1: its classifier {opts.n_way_classifier} is not among --extractors "
                     "(--n-way-classifier picks another)")
    return notes


def markdown_table(results: dict[str, float], name: str, notes: list[str]) -> str:
    """This checkpoint's row beside the published rows, columns in the reference's order."""
    def cell(row: dict, key: str) -> str:
        if key not in row:
            return "–"
        value = row[key]
        return f"{value:.3f}" if key in ("pixcorr", "ssim", "effnet", "swav") else f"{value:.2f}%"

    header = "| | " + " | ".join(f"{t} {'↑' if up else '↓'}" for _, t, up in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for label, row in [(f"**{name}**", results), *REPORTED.items()]:
        lines.append(f"| {label} | " + " | ".join(cell(row, k) for k in _KEYS) + " |")
    return _with_notes(lines, notes + REPORTED_SOURCES)


def _with_notes(lines: list[str], notes: list[str]) -> str:
    """Markdown table lines, then the notes as a list."""
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def score_multilabel(scores: dict, info: dict, subjects: list[int], per_subject: bool, out_dir: Path) -> dict:
    """Per-subject multi-label decoding (mAP, ROC AUC, Hamming loss) on the test split, from a
    recipe's held-out scores; writes results.json and table.md (one row per subject, then the mean)."""
    results = {**info, "subjects": subjects, **scores, "figures": []}
    lines = ["| Subject | mAP | AUC | Hamming |", "|---|---|---|---|"]
    rows = [(f"subj{s:02d}", f"/subj{s:02d}") for s in subjects] if per_subject else []
    for label, suffix in [*rows, (f"mean of {len(subjects)}", "")]:
        lines.append(f"| {label} | " + " | ".join(f"{scores[k + suffix]:.4f}" for k in ("map", "auc", "hamming")) + " |")
    notes = [f"checkpoint {info['checkpoint']}, test split, repeat-averaged voxels",
             "mAP: mean over the classes with a positive in a subject's test set, AUC: over the classes with both labels "
             "(CLIP-MUSED's code counts the others as AP 0 and AUC 1.0); Hamming loss: positive at prob >= 0.5"]
    return _write_report(out_dir, results, lines, notes)


def _write_report(out_dir: Path, results: dict, lines: list[str], notes: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out_dir / "table.md", _with_notes(lines, notes))
    return results


def scores_table(scores: dict) -> list[str]:
    """A recipe's own scores as a markdown table, one row per score."""
    return ["| Score | Value |", "|---|---|"] + [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                 for k, v in scores.items()]


def score_checkpoint(recipe, capabilities: set[str], info: dict, out_dir: Path, recons_path: Path | None,
                     opts: ImageMetricOptions, n_figure: int = 6) -> dict:
    """The report of a recipe holding a checkpoint's weights, by what it declares
    (train/recipe.py; `capabilities` are their names): its own held-out scores ("scores"),
    per subject for a label decoder ("labels"); the retrieval figure ("embeddings"); and,
    with reconstructions of a generating recipe ("generation"), every image metric.
    `info` holds "checkpoint" and "recipe". Writes results.json, table.md and the figures
    into `out_dir`.
    """
    name = info["recipe"]
    if recons_path is not None and "generation" not in capabilities:
        raise ConfigError(f"--recons: recipe {name!r} does not generate images (declares no 'generation'); drop --recons")
    extractors = load_extractors(opts) if recons_path is not None else {}  # missing weights fail before any work
    model = recipe.model
    scores = recipe.score(model, "test") if "scores" in capabilities else {}
    if "labels" in capabilities:
        return score_multilabel(scores, info, recipe.subjects, recipe.cfg.eval.per_subject, out_dir)
    if "embeddings" not in capabilities and recons_path is None:
        notes = [f"checkpoint {info['checkpoint']}, test split"]
        if "generation" in capabilities:
            notes.append(f"recipe {name!r} generates images: `python -m train.reconstruct` writes them, "
                         "`--recons` scores them with the image metrics")
        return _write_report(out_dir, {**info, **scores, "figures": []}, scores_table(scores), notes)

    data, subject = recipe.data, recipe.data.subject
    ids, truth = split_images(data.root, data.manifest, subject, "test", opts.resize)
    results: dict = {**info, "subject": subject, "n_test": len(ids), **scores}
    notes = [f"checkpoint {info['checkpoint']}, subject {subject}, {len(ids)} test images"]
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if "embeddings" in capabilities:
        pairs = recipe.embeddings(model, "test")
        if pairs["image_ids"].tolist() != ids:
            raise DataError(f"{data.root}: test embeddings and test images disagree on sample order")
        if "n_way" in scores:
            notes.append(f"retrieval: top-1 over {scores['n_way']} random test samples, mean of {scores['n_trials']} "
                         "draws; image retrieval = forward (brain -> image), brain retrieval = backward")
        top = scores_lib.top_k_indices(pairs["brain"], pairs["image"], 5)
        figures.append(retrievals_figure(truth, top, ids, out_dir / "retrievals.png", list(range(min(n_figure, len(ids))))))
    else:
        notes.append(f"recipe {name!r} predicts no embeddings: no retrieval")

    if recons_path is not None:
        recons = load_reconstructions(recons_path, ids, opts.resize)
        results.update(image_metrics(truth, recons, extractors, opts))
        results.update(n_generations=recons.shape[1] if recons.dim() == 5 else 1, resize_convention=opts.resize,
                       ssim_window=opts.ssim_window)
        notes.extend(convention_notes(opts, results))
        figures.append(reconstructions_figure(truth, recons, ids, out_dir / "reconstructions.png", n_figure))
        random = sorted(n for n in extractors if opts.weights.get(n) == "random")
        results["random_feature_weights"] = random
        if random:
            notes.append(f"RANDOM feature-extractor weights ({', '.join(random)}): those columns are not comparable")
        if "fid" in results:
            notes.append(f"FID (InceptionV3 avgpool) {results['fid']:.2f}")
    own = {k: v for k, v in scores.items() if k not in _KEYS}
    if own:
        notes.append("the recipe's own test scores: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in own.items()))
    results["figures"] = [str(f) for f in figures]
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out_dir / "table.md", markdown_table(results, Path(info["checkpoint"]).name, notes))
    return results
