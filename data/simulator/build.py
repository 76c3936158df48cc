"""Writes the simulated multi-subject dataset in the project's shard format."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.files import atomic_write_text
from data.shards import FORMAT, MANIFEST, Sample, ShardWriter
from data.simulator import brain
from data.simulator.scenes import CATEGORY_NAMES, draw_scene

GENERATOR_VERSION = 1


@dataclass
class SimulatorConfig:
    seed: int = 0
    n_subjects: int = 4
    voxels: list[int] = field(default_factory=lambda: [3000, 2700, 2850, 2550])  # one per subject, cycled
    n_test: int = 500  # images shared by all subjects
    n_train: int = 2000  # per-subject images
    n_val: int = 200  # per-subject images carved from the training pool
    n_repeats: int = 3
    image_size: int = 128
    early_fraction: float = 0.5
    noise_voxel_fraction: float = 0.15  # voxels with no signal at all
    snr_scale: float = 1.0  # mean signal amplitude relative to trial noise
    common_space: bool = False  # every subject in one voxel space (voxels[0] voxels), e.g. MNI-registered HCP
    individuality: float = 0.3  # common space: each voxel's share of subject-specific tuning
    shard_max_bytes: int = 1 << 30


def _draw_images(rng: np.random.Generator, n: int, size: int):
    scenes = [draw_scene(rng, size) for _ in range(n)]
    return (np.stack([s.image for s in scenes]), np.stack([s.labels for s in scenes]), [s.caption for s in scenes])


def _subject_model(cfg: SimulatorConfig, s: int, model_seed: int, template_seed: int) -> brain.SubjectModel:
    if not cfg.common_space:
        return brain.make_subject(model_seed, cfg.voxels[s % len(cfg.voxels)], cfg.early_fraction,
                                  cfg.noise_voxel_fraction, cfg.snr_scale)
    template = brain.make_subject(template_seed, cfg.voxels[0], cfg.early_fraction, cfg.noise_voxel_fraction, cfg.snr_scale)
    return brain.common_subject(template, model_seed, cfg.individuality, cfg.noise_voxel_fraction, cfg.snr_scale)


def _simulate_subject(cfg: SimulatorConfig, s: int, model_seed: int, template_seed: int,
                      trial_seed: np.random.SeedSequence, semantic: np.ndarray, test, test_features: np.ndarray,
                      tmp: Path) -> tuple[dict, dict]:
    """Draw one subject's own images, simulate its responses and write its shards under `tmp`.

    Returns (the subject's manifest entry, its shards' records). Runs in a worker process.
    """
    subject_id = s + 1
    model = _subject_model(cfg, s, model_seed, template_seed)
    trial_rng = np.random.default_rng(trial_seed)
    n_own = cfg.n_train + cfg.n_val
    own = _draw_images(trial_rng, n_own, cfg.image_size)
    raw_own = brain.raw_responses(model, brain.early_feature_maps(own[0]), own[1], semantic)
    raw_test = brain.raw_responses(model, test_features, test[1], semantic)
    # Standardise with training stimuli only, as NSD's z-scoring leaves the test trials out.
    signal_own = brain.standardise(raw_own, raw_own[: cfg.n_train])
    signal_test = brain.standardise(raw_test, raw_own[: cfg.n_train])
    betas_own = brain.trial_betas(model, signal_own, cfg.n_repeats, trial_rng)
    betas_test = brain.trial_betas(model, signal_test, cfg.n_repeats, trial_rng)
    first_own_id = cfg.n_test + s * n_own  # image ids: shared test images first, then each subject's own
    parts = {
        "train": (own, betas_own, range(0, cfg.n_train), first_own_id),
        "val": (own, betas_own, range(cfg.n_train, n_own), first_own_id),
        "test": (test, betas_test, range(cfg.n_test), 0),
    }
    splits, shards = {}, {}
    for split, ((images, labels, captions), betas, rows, id0) in parts.items():
        writer = ShardWriter(tmp, f"subj{subject_id:02d}/{split}", cfg.shard_max_bytes)
        for i in rows:
            writer.write(Sample(subject_id, id0 + i, betas[i], images[i], (labels[i] > 0).astype(np.float32), [captions[i]]))
        written = writer.close()
        shards.update(written)
        splits[split] = {"n_samples": len(rows), "shards": sorted(written)}
    entry = {"n_voxels": model.n_voxels, "rois": {k: v.tolist() for k, v in model.roi_indices.items()}, "splits": splits}
    return entry, shards


def build(cfg: SimulatorConfig, out: Path, workers: int | None = None) -> Path:
    """Generate the dataset into `out` (which must not exist), atomically.

    Everything is drawn from `cfg.seed`; the same config gives the same bytes whatever the
    number of worker processes (default: one per CPU core, at most one per subject).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; refusing to overwrite a dataset")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seeds = np.random.SeedSequence(cfg.seed).spawn(3 + 2 * cfg.n_subjects)
    semantic = brain.semantic_embeddings(int(seeds[0].generate_state(1)[0]))
    test = _draw_images(np.random.default_rng(seeds[1]), cfg.n_test, cfg.image_size)
    test_features = brain.early_feature_maps(test[0])
    manifest: dict = {
        "format": FORMAT,
        "dataset": "simulated",
        "generator": {"name": "data.simulator", "version": GENERATOR_VERSION, "config": asdict(cfg)},
        "seed": cfg.seed,
        "categories": list(CATEGORY_NAMES),
        "image_size": cfg.image_size,
        "common_space": cfg.common_space,
        "subjects": {},
        "shards": {},
    }
    workers = max(1, min(workers or os.cpu_count() or 1, cfg.n_subjects))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        template_seed = int(seeds[2].generate_state(1)[0])
        jobs = [pool.submit(_simulate_subject, cfg, s, int(seeds[3 + 2 * s].generate_state(1)[0]), template_seed,
                            seeds[4 + 2 * s], semantic, test, test_features, tmp) for s in range(cfg.n_subjects)]
        for _ in tqdm(as_completed(jobs), total=len(jobs), desc="simulating subjects", mininterval=1):
            pass
    for s, job in enumerate(jobs):
        entry, shards = job.result()
        manifest["subjects"][str(s + 1)] = entry
        manifest["shards"].update(shards)
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out
