"""A report on one checkpoint: retrieval on the test split and, given reconstructions, every
image metric (the image metrics alone for a recipe that generates images but predicts no
embeddings, e.g. fmri_ldm); written as results.json, table.md (the reference's column order, beside the
published numbers) and PNG figures.
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
from eval.checkpoint import Checkpoint
from eval.features import SPECS, build_extractor, extract, locate_weights
from eval.figures import reconstructions_figure, retrievals_figure
from eval.images import load_reconstructions, split_images
from train.config import ConfigError
from train.recipes.subject_data import SubjectData

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
    "MindEye 1, 4-subject mean": dict(zip(_KEYS, (.319, .360, 92.8, 96.9, 94.6, 93.3, .648, .377, 90.0, 84.1))),
    "Brain-Diffuser, 4-subject mean": dict(zip(_KEYS, (.273, .365, 94.4, 96.6, 91.3, 90.9, .728, .421, 18.8, 26.3))),
    "Takagi & Nishimoto, 4-subject mean": dict(zip(_KEYS, (.246, .410, 78.9, 85.6, 83.8, 82.1, .811, .504))),
}
REPORTED_SOURCES = [
    "MindEye 1, subject 1: MindEye 1's paper (Scotti et al. 2023), computed with its `Reconstruction_Metrics` code",
    "MindEye 2 (40 sessions), subject 1: the per-subject table of MindEye 2's paper (arXiv 2403.11207v2)",
    "4-subject means: MindEye 2's paper (arXiv 2403.11207v2), all rows scored with MindEye's metric code "
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
            out[key] = metrics.two_way_identification(real[key].to(d), fake[key].to(d))
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


def score_multilabel(recipe, ckpt: Checkpoint, out_dir: Path) -> dict:
    """Per-subject multi-label decoding (mAP, ROC AUC, Hamming loss) on the test split by a
    recipe holding the checkpoint's weights; writes results.json and table.md (one row per
    subject, then the mean)."""
    scores = recipe.score(recipe.model, "test")
    results = {"checkpoint": ckpt.source, "recipe": ckpt.cfg.recipe, "subjects": recipe.subjects, **scores, "figures": []}
    lines = ["| Subject | mAP | AUC | Hamming |", "|---|---|---|---|"]
    rows = [(f"subj{s:02d}", f"/subj{s:02d}") for s in recipe.subjects] if ckpt.cfg.eval.per_subject else []
    for label, suffix in [*rows, (f"mean of {len(recipe.subjects)}", "")]:
        lines.append(f"| {label} | " + " | ".join(f"{scores[k + suffix]:.4f}" for k in ("map", "auc", "hamming")) + " |")
    notes = [f"checkpoint {ckpt.source}, test split, repeat-averaged voxels",
             "mAP: mean over the classes with a positive in a subject's test set, AUC: over the classes with both labels "
             "(CLIP-MUSED's code counts the others as AP 0 and AUC 1.0); Hamming loss: positive at prob >= 0.5"]
    return _write_report(out_dir, results, lines, notes)


def _write_report(out_dir: Path, results: dict, lines: list[str], notes: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out_dir / "table.md", _with_notes(lines, notes))
    return results


def score_own(recipe, ckpt: Checkpoint, out_dir: Path) -> dict:
    """The test scores a recipe defines for itself (e.g. masked reconstruction of held-out
    subjects); writes results.json and table.md (one row per score)."""
    scores = recipe.score(recipe.model, "test")
    results = {"checkpoint": ckpt.source, "recipe": ckpt.cfg.recipe, **scores, "figures": []}
    lines = ["| Score | Value |", "|---|---|"] + [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                  for k, v in scores.items()]
    return _write_report(out_dir, results, lines, [f"checkpoint {ckpt.source}, test split"])


def score_checkpoint(ckpt: Checkpoint, out_dir: Path, recons_path: Path | None, opts: ImageMetricOptions,
                     n_figure: int = 6) -> dict:
    """Retrieval (and, with reconstructions, every image metric) on the checkpoint's test split.

    Writes results.json, table.md, retrievals.png and reconstructions.png into `out_dir`.
    """
    module = __import__(f"train.recipes.{ckpt.cfg.recipe}", fromlist=["Recipe"])
    labels = hasattr(module.Recipe, "predict_labels")
    embeds = hasattr(module.Recipe, "embeddings")
    generates = not labels and not embeds and hasattr(module.Recipe, "generate")  # images only (fmri_ldm)
    own = not (labels or embeds or generates) and hasattr(module.Recipe, "score")  # its own scores only (mbm)
    if (labels or own) and recons_path is not None:
        raise ConfigError(f"{ckpt.source}: recipe {ckpt.cfg.recipe!r} does not decode images; drop --recons")
    if generates and recons_path is None:
        raise ConfigError(f"{ckpt.source}: recipe {ckpt.cfg.recipe!r} predicts no embeddings, only images; pass --recons "
                          "(the folder `python -m train.reconstruct` wrote)")
    extractors = load_extractors(opts) if recons_path is not None else {}  # missing weights fail before any work
    if not (labels or embeds or generates or own):
        raise ConfigError(f"{ckpt.source}: recipe {ckpt.cfg.recipe!r} predicts no embeddings to score; score the "
                          "reconstructions it feeds through the MindEye checkpoint")
    if generates:  # the images alone are scored: no model is needed, only the test stimuli
        recipe = SubjectData(ckpt.cfg)
    else:
        recipe = module.Recipe(ckpt.cfg, 0, 1, opts.device, train=False)
        ckpt.load_into(recipe.model)
        recipe.model.to(opts.device).eval()
    if labels:
        return score_multilabel(recipe, ckpt, out_dir)
    if own:
        return score_own(recipe, ckpt, out_dir)
    subject = ckpt.cfg.data.subject
    ids, truth = split_images(recipe.root, recipe.manifest, subject, "test", opts.resize)
    results: dict = {"checkpoint": ckpt.source, "recipe": ckpt.cfg.recipe, "subject": subject, "n_test": len(ids)}
    notes = [f"checkpoint {ckpt.source}, subject {subject}, {len(ids)} test images"]
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []

    if generates:
        notes.append(f"recipe {ckpt.cfg.recipe!r} generates images and predicts no embeddings: no retrieval")
    else:
        pairs = recipe.embeddings(recipe.model, "test")
        if pairs["image_ids"].tolist() != ids:
            raise DataError(f"{recipe.root}: test embeddings and test images disagree on sample order")
        results.update(recipe.score(pairs))
        notes.append(f"retrieval: top-1 over {results['n_way']} random test samples, mean of {results['n_trials']} draws; "
                     "image retrieval = forward (brain -> image), brain retrieval = backward")
        top = metrics.top_k_indices(pairs["brain"], pairs["image"], 5)
        figures.append(retrievals_figure(truth, top, ids, out_dir / "retrievals.png", list(range(min(n_figure, len(ids))))))

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
    results["figures"] = [str(f) for f in figures]
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out_dir / "table.md", markdown_table(results, Path(ckpt.source).name, notes))
    return results
