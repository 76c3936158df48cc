"""Masked brain modeling recipe (MinD-Vis, DC-MAE phase 1): held-out subjects, DC-MAE's
contrastive terms, streaming many subjects, voxel-count transfer, ZeRO-3 with activation
checkpointing, the warm-up cosine schedule."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from data import splits
from eval.main import main as eval_main
from models.mbm import MaskedBrainModel, fit_voxels, voxel_fit
from tests.conftest import ROOT, launch, train_losses
from train import config
from train.config import ConfigError
from train.engine import make_optimizer, make_schedule
from train.losses import info_nce
from train.components.mbm_encoder import load_pretrained_encoder
from models.errors import InputError
from train.recipes.mbm import Recipe

TINY = "train/configs/mbm_tiny.yaml"
# 6 subjects in one voxel space: 4 pretrain, 2 held out.
SIM = ["data.simulator.n_subjects=6", "data.simulator.voxels=[400]", "data.simulator.n_train=96",
       "data.simulator.n_val=8", "data.simulator.n_test=32", "data.simulator.image_size=32",
       "data.simulator.shard_max_bytes=60000", "data.heldout_subjects=[5,6]"]
SMALL_MODEL = ["model.dim=64", "model.depth=2", "model.decoder_dim=32", "model.decoder_depth=1"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _untrained_score(run_dir, cache, monkeypatch) -> dict:
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    cfg = config.load(run_dir / "config.yaml", [])
    torch.manual_seed(cfg.seed)
    recipe = Recipe(cfg, 0, 1, torch.device("cpu"), train=False)
    return recipe.score(recipe.model.eval(), "test")


def test_pretraining_lowers_heldout_masked_mse_and_dcmae_separates_two_maskings_of_a_sample(tmp_path, monkeypatch):
    """4 subjects pretrain (streamed from shards; DC-MAE from memory); 2 never seen are scored.

    MinD-Vis' loss alone: held-out masked MSE at most 0.85 x an untrained encoder's and below
    predicting zeros. DC-MAE (self- and cross-contrast on): the cosine similarity of the
    reconstructions of two maskings of one held-out sample exceeds that of different samples
    by at least 0.2, and by more than under MinD-Vis' loss alone."""
    cache, runs = tmp_path / "cache", {"mbm": tmp_path / "mbm", "dcmae": tmp_path / "dcmae"}
    contrast = {"mbm": [], "dcmae": ["loss.self_contrast=1.0", "loss.cross_contrast=1.0", "data.loader=memory"]}
    with ThreadPoolExecutor(len(runs)) as pool:  # side by side: one rank and thread each
        done = list(pool.map(lambda name: launch(["--config", TINY, f"run_dir={runs[name]}", *SIM, *SMALL_MODEL,
                                                  "train.epochs=12", "train.batch_size=16", *contrast[name],
                                                  "ds.bf16.enabled=false"], 1, cache), runs))
    for result in done:
        _ok(result)
    trained, dcmae = (json.loads((r / "test_results.json").read_text()) for r in runs.values())
    untrained = _untrained_score(runs["mbm"], cache, monkeypatch)
    assert trained["n_subjects"] == 2 and trained["voxel_fit"] == "none"
    assert trained["masked_mse"] < 0.85 * untrained["masked_mse"], (trained, untrained)
    assert trained["masked_mse"] < trained["zero_mse"] - 0.05 and trained["masked_r"] > 0.15, trained
    gap = {k: r["views_same_cos"] - r["views_other_cos"] for k, r in (("mbm", trained), ("dcmae", dcmae))}
    assert gap["dcmae"] >= 0.2, (gap, dcmae)

    records = [json.loads(line) for line in (runs["dcmae"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["loss"] == pytest.approx(last["recon"] + last["self_contrast"] + last["cross_contrast"], rel=1e-5)
    logged = {k for line in (runs["mbm"] / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert "recon" in logged and "cross_contrast" not in logged

    assert eval_main(["--checkpoint", str(runs["mbm"]), "--device", "cpu"]) == 0  # the eval CLI scores it alike
    scored = json.loads((runs["mbm"] / "eval" / "results.json").read_text())
    assert scored["masked_mse"] == pytest.approx(trained["masked_mse"], rel=1e-5) and scored["recipe"] == "mbm"
    assert "| masked_r |" in (runs["mbm"] / "eval" / "table.md").read_text()

    encoder = load_pretrained_encoder(str(runs["mbm"]), "encoder.checkpoint")
    assert encoder.n_voxels == 400 and encoder.patch_embed.weight.shape == (64, 1, 16)
    with pytest.raises(InputError, match="encoder.checkpoint"):
        load_pretrained_encoder(str(tmp_path / "nowhere"), "encoder.checkpoint")


def test_zero3_with_block_checkpointing_gives_zero2_losses_on_2_ranks(tmp_path):
    base = ["--config", TINY, *SIM, *SMALL_MODEL, "data.loader=memory", "train.epochs=1", "train.batch_size=32",
            "loss.cross_contrast=1.0", "ds.bf16.enabled=false"]
    cache = tmp_path / "cache"
    _ok(launch(["--ds_config", "ds_configs/zero2.json", *base, f"run_dir={tmp_path / 'z2'}"], 2, cache))
    _ok(launch(["--ds_config", "ds_configs/zero3.json", *base, f"run_dir={tmp_path / 'z3'}",
                "model.checkpoint_blocks=true"], 2, cache))
    z2, z3 = train_losses(tmp_path / "z2"), train_losses(tmp_path / "z3")
    assert len(z2) == 12 and len(set(z2.values())) > 10  # 4 subjects x 96 / 32
    for step in z2:
        assert z3[step] == pytest.approx(z2[step], rel=1e-4), step


def test_many_subjects_stream_from_shards_without_loading_a_split(tmp_path, monkeypatch):
    """The stream loader reads shards of every pretraining subject; no split is loaded whole.
    Native-space subjects of different sizes are wrap-padded or truncated to the encoder's count."""
    monkeypatch.setenv("FMRIDECODE_CACHE", str(tmp_path / "cache"))
    cfg = config.load(ROOT / TINY, [*SIM, *SMALL_MODEL, "data.simulator.common_space=false",
                                    "data.simulator.voxels=[400,300,500]", "data.num_workers=0",
                                    "train.batch_size=32", "data.shuffle_buffer=64"])
    monkeypatch.setattr(splits, "load_split", lambda *a, **k: pytest.fail("a split was loaded into memory"))
    recipe = Recipe(cfg, 0, 1, torch.device("cpu"))
    assert recipe.subjects == [1, 2, 3, 4] and recipe.n_voxels == cfg.model.n_voxels == 400
    batches = [b for step in recipe.loader.epoch(0) for b in step]
    assert len(batches) == recipe.loader.steps_per_epoch == 4 * 96 // 32
    assert {b["voxels"].shape for b in batches} == {(32, 400)}
    seen, voxels = torch.cat([b["subjects"] for b in batches]), torch.cat([b["voxels"] for b in batches])
    assert set(seen.tolist()) == {1, 2, 3, 4}
    padded = voxels[seen == 2]  # 300 voxels, wrap-padded to 400
    assert torch.equal(padded[:, 300:], padded[:, :100]) and not torch.equal(voxels[seen == 1][:, 300:], voxels[seen == 1][:, :100])


def test_voxel_fit_wrap_pads_shorter_and_truncates_longer():
    x = torch.arange(10.0)[None]
    assert voxel_fit(10, 16) == "wrap-pad" and torch.equal(fit_voxels(x, 16)[0, 10:], x[0, :6])
    assert voxel_fit(10, 4) == "truncate" and torch.equal(fit_voxels(x, 4), x[:, :4])
    assert voxel_fit(10, 10) == "none" and torch.equal(fit_voxels(x, 10), x)
    assert fit_voxels(torch.ones(2, 3, 5), 7).shape == (2, 3, 7)  # repeats x voxels, as in memory splits


def test_info_nce_is_low_for_aligned_pairs_and_symmetric():
    torch.manual_seed(0)
    a = torch.randn(8, 20)
    aligned, shuffled = info_nce(a, a + 0.01 * torch.randn(8, 20), 0.1), info_nce(a, a[torch.randperm(8)], 0.1)
    assert aligned < 0.01 < shuffled
    b = torch.randn(8, 20)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.1
    expected = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    torch.testing.assert_close(info_nce(a, b, 0.1), expected)


def test_warmup_cosine_schedule_and_betas_come_from_the_config():
    cfg = config.load(ROOT / TINY, ["train.epochs=10", "train.warmup_epochs=2", "train.lr=1e-3"])
    model = MaskedBrainModel(64, patch_size=16, dim=16, depth=1, heads=2, decoder_dim=8, decoder_depth=1, decoder_heads=2)
    optimizer = make_optimizer(model, cfg, {})
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    scheduler = make_schedule(cfg, steps_per_epoch=5)(optimizer)
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert lrs[30] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 20 / 40)).item()))
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_heldout_subjects_must_not_be_trained_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(tmp_path / "cache"))
    cfg = config.load(ROOT / TINY, [*SIM, "data.subjects=[1,5]"])
    with pytest.raises(ConfigError, match="data.heldout_subjects: subject 5"):
        Recipe(cfg, 0, 1, torch.device("cpu"), train=False)
