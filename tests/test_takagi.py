"""Takagi & Nishimoto (takagi) and the ridge baseline (ridge_clip) on a small simulated dataset:
closed-form fit -> test scores -> img2img generation -> eval report; resume of a killed fit;
img2img's step count and batch independence; caption averaging; clear errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from train.checkpoint import load_checkpoint
from data.diffusers_weights import load_stable_diffusion
from data.pretrained_weights import WeightsMissing
from eval.main import main as eval_main
from models.stable_diffusion import (
    caption_embeddings,
    img2img,
    tiny_stable_diffusion,
)
from tests.conftest import ROOT
from train import closed_form, config, reconstruct, registry
from train import main as train_main
from train.recipes import ridge_clip, takagi

TINY = str(ROOT / "train/configs/takagi_tiny.yaml")
SIM = {"n_subjects": 1, "voxels": [400], "n_train": 240, "n_val": 20, "n_test": 12, "image_size": 32}
SMALL = [*(f"data.simulator.{k}={json.dumps(v).replace(' ', '')}" for k, v in SIM.items()),
         "sd.latent_size=32", "generation.size=32", "generation.steps=5", "generation.n_samples=2",
         "generation.batch_size=5", "ridge.alphas=[1,100,10000,1000000]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("runs") / "takagi"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMRIDECODE_CACHE", str(cache))
        assert train_main.main(["--config", TINY, f"run_dir={run}", *SMALL]) == 0
    return run


def _cfg(*extra):
    return config.load(ROOT / TINY, [*SMALL, *extra])


def test_fit_decodes_both_targets_above_chance(run_dir):
    results = json.loads((run_dir / "test_results.json").read_text())
    print({k: round(v, 3) for k, v in results.items() if k != "split"})
    # The simulated early ROI sees local contrast and colour, the ventral ROI categories: both
    # decoders identify their test targets well above chance (50%).
    assert results["latent_two_way"] > 60 and results["text_two_way"] > 75
    assert results["latent_r"] > 0 and results["text_r"] > 0
    fits = {r["split"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    latent, text = fits["fit/latent"], fits["fit/text"]
    assert latent["n_targets"] == 4 * 8 * 8 and text["n_targets"] == 77 * 32  # 32 px -> tiny VAE 4x8x8; 77 x width 32
    assert latent["n_trials"] == SIM["n_train"] * 3 and latent["n_voxels"] + text["n_voxels"] == 400  # early + ventral
    assert 1 <= text["alpha_min"] <= text["alpha_median"] <= text["alpha_max"] <= 1e6
    ckpt = load_checkpoint(run_dir)
    assert ckpt.state["latent.weight"].shape == (latent["n_voxels"], 256) and ckpt.state["latent.roi"].dtype == torch.long


def test_a_killed_fit_resumes_with_the_decoders_left_and_is_never_overwritten_silently(run_dir, tmp_path, cache,
                                                                                        monkeypatch, capsys):
    copy = tmp_path / "run"
    folder = copy / "checkpoints" / "ridge"
    folder.mkdir(parents=True)
    (folder / "latent.pt").write_bytes((run_dir / "checkpoints" / "ridge" / "latent.pt").read_bytes())
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    capsys.readouterr()
    assert train_main.main(["--config", TINY, f"run_dir={copy}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "already holds a fit" in err and "--resume" in err
    assert train_main.main(["--config", TINY, "--resume", f"run_dir={copy}", *SMALL]) == 0
    err = capsys.readouterr().err
    assert "decoder 'text'" in err and "decoder 'latent'" not in err  # only the missing one
    mine, full = load_checkpoint(copy).state, load_checkpoint(run_dir).state
    assert mine.keys() == full.keys() and all(torch.equal(mine[k], full[k]) for k in full)
    assert json.loads((copy / "test_results.json").read_text()) == json.loads((run_dir / "test_results.json").read_text())


def test_generate_resumably_and_score_the_images(run_dir, env, tmp_path):
    out, device = tmp_path / "recons", torch.device("cpu")
    _, recipe = registry.from_checkpoint(run_dir, None, [], device)
    assert reconstruct.generate(recipe, out, rank=0, world=2) == SIM["n_test"] // 2
    assert reconstruct.main(["--checkpoint", str(run_dir), "--out", str(out), "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == 2 * SIM["n_test"]
    report = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(run_dir), "--recons", str(out), "--out", str(report), "--random-weights",
                      "--extractors", "alexnet,inception", "--n-way-classifier", "inception", "--device", "cpu"]) == 0
    r = json.loads((report / "results.json").read_text())
    for key in ("pixcorr", "ssim", "alexnet2", "inception", "inception_50way_top1"):
        assert math.isfinite(r[key]), key
    assert r["recipe"] == "takagi" and r["n_generations"] == 2 and r["n_test"] == SIM["n_test"]


def test_img2img_runs_strength_x_steps_with_guidance_and_is_batch_independent():
    pipe = tiny_stable_diffusion(sample_size=8)
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    latents, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    uncond = caption_embeddings(pipe, [[""]])
    both = img2img(pipe, latents, embeds, uncond, [7, 8], size=32, strength=0.8, steps=10, guidance=5.0, n_samples=3)
    assert both.shape == (2, 3, 3, 32, 32) and 0 <= both.min() and both.max() <= 1
    assert calls == [2 * 2 * 3] * 8  # 8 of 10 steps, conditional and unconditional rows together
    second = img2img(pipe, latents[1:], embeds[1:], uncond, [8], size=32, strength=0.8, steps=10, guidance=5.0, n_samples=3)
    assert torch.allclose(both[1], second[0], atol=1e-5)  # the same seed gives the same images in any batch
    assert not torch.allclose(both[1, 0], both[1, 1])  # samples differ


def test_caption_embeddings_average_each_images_captions():
    pipe = tiny_stable_diffusion()
    one = caption_embeddings(pipe, [["a red square"], ["two blue circles"], [""]])
    mixed = caption_embeddings(pipe, [["a red square", "two blue circles"], []])
    assert mixed.shape == (2, 77, 32)
    assert torch.allclose(mixed[0], (one[0] + one[1]) / 2, atol=1e-6)
    assert torch.allclose(mixed[1], one[2], atol=1e-6)  # no caption: the empty prompt


def test_a_stable_diffusion_folder_loads_and_missing_parts_are_one_line_errors(tmp_path):
    folder = tmp_path / "sd"
    tiny_stable_diffusion(seed=3).save_pretrained(folder)
    loaded = load_stable_diffusion(str(folder), "sd.weights")
    original = tiny_stable_diffusion(seed=3)
    assert torch.equal(loaded.unet.conv_in.weight, original.unet.conv_in.weight)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert caption_embeddings(loaded, [["a cat"]]).allclose(caption_embeddings(original, [["a cat"]]), atol=1e-6)
    (folder / "text_encoder" / "config.json").unlink()
    with pytest.raises(WeightsMissing) as e:
        load_stable_diffusion(str(folder), "sd.weights")
    text = str(e.value)
    assert "\n" not in text and "text_encoder/config.json" in text and "sd.weights" in text


def test_bad_config_is_refused_with_the_key_named(env):
    with pytest.raises(config.ConfigError, match="sd.weights is not set"):
        takagi.Recipe(_cfg("sd.weights=''"), 0, 1, torch.device("cpu"))
    with pytest.raises(config.ConfigError, match=r"text_roi: subject 1 has no ROI 'v4'.*\['all', 'early', 'ventral'\]"):
        takagi.Recipe(_cfg("text_roi=v4"), 0, 1, torch.device("cpu"))
    with pytest.raises(config.ConfigError, match="train"):
        _cfg("train.epochs=3")  # closed-form recipes have no optimizer keys
    for bad, message in (("ridge.alphas=[0,10]", "ridge.alphas"), ("ridge.folds=1", "ridge.folds"),
                         ("ridge.dtype=half", "ridge.dtype")):
        with pytest.raises(config.ConfigError, match=message):
            closed_form.check_ridge(_cfg(bad).ridge)


def test_ridge_baseline_retrieves_above_chance(env, tmp_path, cache):
    run = tmp_path / "ridge"
    overrides = [*(f"data.simulator.{k}={json.dumps(v).replace(' ', '')}" for k, v in SIM.items()),
                 "clip.tiny.image_size=32", "clip.tiny.width=32", "clip.tiny.layers=1", "clip.tiny.heads=2",
                 "clip.tiny.output_dim=16", "eval.n_way=12", "ridge.alphas=[10,1000,100000]"]
    assert train_main.main(["--config", str(ROOT / "train/configs/ridge_clip_tiny.yaml"), f"run_dir={run}", *overrides]) == 0
    r = json.loads((run / "test_results.json").read_text())
    assert r["n_way"] == 12 and r["forward_top1"] > 2 * 100 / 12 and r["backward_top1"] > 2 * 100 / 12
    ckpt = load_checkpoint(run)
    recipe = ridge_clip.Recipe(ckpt.cfg, 0, 1, torch.device("cpu"))
    recipe.model.load_state_dict(ckpt.state)
    again = recipe.score(recipe.model, "test")
    assert again["forward_top1"] == r["forward_top1"]  # the eval package's path gives the run's numbers
