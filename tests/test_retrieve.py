"""Large-pool retrieval on the simulated brain (`python -m eval.retrieve`): a pooled MindEye model's test
samples find their own image in a pool of every stimulus the subject saw plus 10,000 distractor embeddings
(the run's CLIP embeddings of random smooth colour fields), exactly and through an approximate index; the
chosen images are scored by the image metrics; bad input is one error line. (With distractors drawn from the
stimuli's own distribution and the full tiny config: benchmarks/pooled_retrieval.py, figures in
docs/evaluation.md.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.retrieve import main as retrieve_main
from tests.conftest import ROOT, train_here
from train.checkpoint import load_checkpoint
from train.components.clip_targets import clip_encoder

POOLED = str(ROOT / "train/configs/mindeye_pooled_tiny.yaml")
N_DISTRACTORS = 10_000


@pytest.fixture(scope="module")
def pooled_run(small_dataset, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "pooled"
    train_here(["--config", POOLED, f"run_dir={run}", f"data.root={small_dataset}", "prior.enabled=false",
                "train.epochs=8", "train.batch_size=16", "ds.bf16.enabled=false"], cache)
    return run


@pytest.fixture(scope="module")
def distractors(pooled_run, tmp_path_factory):
    """The run's CLIP embeddings (pooled) of random smooth colour fields (4 x 4 noise, upsampled)."""
    clip = clip_encoder(load_checkpoint(pooled_run).cfg.clip)
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for _ in range(0, N_DISTRACTORS, 1000):
            fields = F.interpolate(torch.rand(1000, 3, 4, 4, generator=g), size=clip.image_size, mode="bicubic")
            images = (fields.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            out.append(clip(images)[:, 0].numpy())
    path = tmp_path_factory.mktemp("pool") / "distractors.npy"
    np.save(path, np.concatenate(out))
    return path


def build(args, capsys):
    assert retrieve_main(["build", *args, "--device", "cpu"]) == 0, capsys.readouterr().err


def test_a_pooled_model_finds_its_images_among_ten_thousand_distractors(pooled_run, distractors, small_dataset, cache,
                                                                        tmp_path, monkeypatch, capsys):
    """Exact search (the approximate kinds' recall against exact: tests/test_retrieval_index.py)."""
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    pool, out = tmp_path / "pool", tmp_path / "retrieved"
    build(["--checkpoint", str(pooled_run), "--stimuli", "--embeddings", str(distractors),
           "--out", str(pool), f"data.root={small_dataset}"], capsys)
    assert retrieve_main(["query", "--checkpoint", str(pooled_run), "--index", str(pool), "--out", str(out), "--k", "16",
                          "--device", "cpu", "--random-weights", "--extractors", "alexnet",
                          f"data.root={small_dataset}"]) == 0, capsys.readouterr().err
    r = json.loads((out / "retrieval.json").read_text())
    n_pool = r["pool_size"]
    assert r["index_kind"] == "exact" and n_pool >= N_DISTRACTORS + 40
    assert r["in_pool"] == 100 and r["query"] == "brain embeddings"
    print(f"exact: hit@1 {r['hit@1']:.1f}%, hit@10 {r['hit@10']:.1f}% in a pool of {n_pool} (chance "
          f"{r['chance']['hit@10']:.3f}%); chosen = seen {r['chosen_is_seen']:.1f}%")
    assert r["hit@10"] >= 100 * r["chance"]["hit@10"]  # measured: 15% against 0.1% by chance
    assert r["hit@16"] >= r["hit@10"] >= r["hit@5"] >= r["hit@1"]
    top = json.loads((out / "topk.json").read_text())
    assert len(top) == 40 and all(len(t["rows"]) == 16 and t["scores"] == sorted(t["scores"], reverse=True) for t in top)
    # every sample has a stimulus among its top 16 (measured), so the chosen images are scored
    assert sorted(p.name for p in (out / "chosen").glob("*.png")) == sorted(f"{t['image_id']}.png" for t in top)
    metrics = json.loads((out / "report" / "results.json").read_text())
    assert 0 <= metrics["alexnet2"] <= 100 and "pixcorr" in metrics and "alexnet2" in r["image_metrics"]
    assert f"index kind {r['index_kind']}" in (out / "table.md").read_text()


def test_bad_retrieval_input_is_one_error_line(pooled_run, small_dataset, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    assert retrieve_main(["query", "--checkpoint", str(pooled_run), "--index", str(tmp_path / "none"), "--out",
                          str(tmp_path / "o"), f"data.root={small_dataset}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "none" in err[0]
    wide = tmp_path / "wide.npy"
    np.save(wide, np.random.default_rng(0).standard_normal((50, 24)).astype(np.float32))
    pool = tmp_path / "pool"
    build(["--embeddings", str(wide), "--out", str(pool)], capsys)
    assert retrieve_main(["query", "--checkpoint", str(pooled_run), "--index", str(pool), "--out", str(tmp_path / "o"),
                          f"data.root={small_dataset}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vectors of 24, but the checkpoint predicts 64" in err[0]
    assert retrieve_main(["build", "--out", str(tmp_path / "p2")]) == 2
    assert "give the pool" in capsys.readouterr().err
