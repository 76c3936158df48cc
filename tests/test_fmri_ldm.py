"""MinD-Vis stage B (fmri_ldm): which parameters train, the conditioning at paper sizes, voxel
transfer, train -> generate (DDIM, PLMS) -> score on a tiny simulated dataset, and clear
errors for missing weights."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from train.checkpoint import load_checkpoint
from data.diffusers_weights import load_ldm_unet
from data.pretrained_weights import WeightsMissing
from eval.main import main as eval_main
from models.fmri_ldm import (
    FMRILDM,
    PooledConditioning,
    set_trainable,
    tiny_unet,
)
from models.errors import InputError
from models.image_variation import SD_SCHEDULE, tiny_vae
from models.mbm import MaskedBrainModel
from tests.conftest import ROOT
from train import config, reconstruct, registry
from train import main as train_main
from train.recipes import fmri_ldm
from train.components.mbm_encoder import build_encoder

TINY = str(ROOT / "train/configs/fmri_ldm_tiny.yaml")
# Two native-space subjects (300 and 260 voxels), 32 px stimuli -> 4 x 8 x 8 latents.
SIM = {"n_subjects": 2, "common_space": False, "voxels": [300, 260], "n_train": 32, "n_val": 8, "n_test": 6,
       "n_repeats": 2, "image_size": 32}
SMALL = [*(f"data.simulator.{k}={json.dumps(v).replace(' ', '')}" for k, v in SIM.items()), "data.subject=1",
         "encoder.model.n_voxels=0", "encoder.model.dim=32", "encoder.model.depth=1", "encoder.model.heads=2",
         "ldm.context_dim=16", "ldm.image_size=32", "generation.steps=3", "generation.n_samples=2",
         "generation.batch_size=4", "train.batch_size=16", "train.epochs=2", "ds.bf16.enabled=false"]
TRAINABLE = re.compile(r"^(encoder\.|conditioning\.|unet\.class_embedding\.|unet\..*transformer_blocks\.\d+\.(attn2|norm2)\.)")


def _tiny_model(n_voxels: int = 300, context: int = 16) -> FMRILDM:
    torch.manual_seed(0)
    return FMRILDM(MaskedBrainModel(n_voxels, dim=32, depth=1, heads=2, decoder_depth=0), tiny_unet(context, 8))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("runs") / "ldm"
    stderr = io.StringIO()  # the run's log (a module fixture has no capsys)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setenv("FMRIDECODE_CACHE", str(cache))
        code = train_main.main(["--config", TINY, f"run_dir={run}", *SMALL])
    assert code == 0, stderr.getvalue()[-3000:]
    assert "voxel fit: subject 1 has 300 voxels, the encoder 300: none" in stderr.getvalue()
    return run


def test_only_encoder_conditioning_cross_attention_and_its_norm_train():
    model = _tiny_model()
    set_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    every = {n for n, _ in model.named_parameters()}
    assert trainable == {n for n in every if TRAINABLE.match(n)}
    assert any(".attn2.to_k." in n for n in trainable) and "unet.class_embedding.linear_1.weight" in trainable
    assert not any(".attn1." in n or ".resnets." in n or ".ff." in n for n in trainable)
    assert not any("decoder" in n or "mask_token" in n for n in every)  # the MAE decoder is dropped

    frozen_conv = "unet.down_blocks.0.resnets.0.conv1.weight"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    eps = model(torch.randn(3, 300), torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999]))
    eps.square().mean().backward()
    opt.step()
    after = model.state_dict()
    for name in ("encoder.blocks.0.linear1.weight", "conditioning.token_map.weight", "conditioning.proj.weight",
                 "unet.class_embedding.linear_2.weight", "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight",
                 "unet.mid_block.attentions.0.transformer_blocks.0.norm2.weight"):
        assert not torch.equal(before[name], after[name]), name
    for name in (frozen_conv, "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", "unet.conv_in.weight"):
        assert torch.equal(before[name], after[name]), name


def test_conditioning_at_mind_vis_sizes_on_the_meta_device():
    """262 patches + cls token of width 1024 (4183 HCP voxels) -> 77 x 512; pooled -> time embedding."""
    with torch.device("meta"):
        mae = MaskedBrainModel(4183, decoder_depth=0)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=512,
            attention_head_dim=32, class_embed_type="projection", projection_class_embeddings_input_dim=512)
        model = FMRILDM(mae, unet)
        tokens = mae.encode(torch.randn(2, 4183))[0]
        context, pooled = model.conditioning(tokens)
        time_cond = unet.class_embedding(pooled)
    assert tokens.shape == (2, 263, 1024) and model.conditioning.token_map.in_channels == 263
    assert context.shape == (2, 77, 512) and pooled.shape == (2, 512)
    assert time_cond.shape == (2, 4 * 224)  # the time-embedding width, to which it is added
    assert isinstance(model.conditioning, PooledConditioning) and model.conditioning.proj.weight.shape == (512, 1024)


def _cfg(*extra):
    return config.load(ROOT / TINY, [*SMALL, *extra])


@pytest.mark.parametrize("subject, fit", [(1, "truncate"), (2, "wrap-pad")])
def test_a_pretrained_encoder_meets_another_voxel_count(subject, fit, env, monkeypatch):
    """An encoder pretrained on 280 voxels: subject 1 (300) is truncated, subject 2 (260) wrap-padded;
    its architecture is recorded in encoder.model."""
    pretrained = build_encoder(config.load(ROOT / "train/configs/mbm_tiny.yaml", [
        "model.n_voxels=280", "model.dim=32", "model.depth=1", "model.heads=2"]).model)
    monkeypatch.setattr(fmri_ldm, "load_pretrained_encoder", lambda path, flag: pretrained)
    cfg = _cfg("encoder.checkpoint=/some/mbm/run", f"data.subject={subject}")
    recipe = fmri_ldm.Recipe(cfg, 0, 1, torch.device("cpu"))
    assert recipe.voxel_fit == fit and recipe.model.encoder is pretrained
    assert cfg.encoder.model.n_voxels == 280 and cfg.encoder.model.dim == 32 and cfg.encoder.model.depth == 1
    batch = next(iter(recipe.loader.epoch(0)))[0]
    assert batch["voxels"].shape[1] == (300 if subject == 1 else 260)
    eps = recipe.model(batch["voxels"], torch.randn(len(batch["voxels"]), 4, 8, 8), torch.zeros(len(batch["voxels"]), dtype=torch.long))
    assert eps.shape == (16, 4, 8, 8)
    assert recipe.score(recipe.model, "val")["voxel_fit"] == fit


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_missing_weights_are_one_line_errors_naming_the_key(env, tmp_path, capsys):
    with pytest.raises(WeightsMissing) as e:
        fmri_ldm.Recipe(_cfg(f"ldm.weights={tmp_path / 'nowhere'}"), 0, 1, torch.device("cpu"))
    assert "ldm.weights" in _one_line(e) and "nowhere" in str(e.value)
    with pytest.raises(InputError) as e:
        fmri_ldm.Recipe(_cfg(f"encoder.checkpoint={tmp_path / 'no_run'}"), 0, 1, torch.device("cpu"))
    assert "encoder.checkpoint" in _one_line(e) and "no_run" in str(e.value)
    with pytest.raises(config.ConfigError) as e:
        fmri_ldm.Recipe(_cfg("encoder.checkpoint=''"), 0, 1, torch.device("cpu"))
    assert "encoder.checkpoint is not set" in _one_line(e)

    # A diffusers folder: the UNet gains only the class embedding; a wrong context width or a
    # weight file with other keys missing is refused; so is a folder missing its weights.
    folder = tmp_path / "ldm"
    torch.manual_seed(0)
    plain = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8)
    plain.save_pretrained(folder / "unet")
    tiny_vae(8).save_pretrained(folder / "vae")
    DDPMScheduler(**SD_SCHEDULE).save_pretrained(folder / "scheduler")
    unet = load_ldm_unet(str(folder), "ldm.weights", 16)
    assert torch.equal(unet.conv_in.weight, plain.conv_in.weight) and unet.class_embedding is not None
    with pytest.raises(config.ConfigError) as e:
        fmri_ldm.Recipe(_cfg(f"ldm.weights={folder}", "ldm.context_dim=24"), 0, 1, torch.device("cpu"))
    assert "ldm.context_dim is 24" in _one_line(e) and "cross_attention_dim is 16" in str(e.value)
    state = plain.state_dict()
    del state["conv_in.bias"]
    from safetensors.torch import save_file
    save_file(state, folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"beyond the new class embedding .*conv_in.bias"):
        load_ldm_unet(str(folder), "ldm.weights", 16)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsMissing) as e:
        load_ldm_unet(str(folder), "ldm.weights", 16)
    assert "ldm.weights" in _one_line(e)


def test_training_moves_only_the_trainable_parameters(run_dir, env):
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["voxel_fit"] == "none" and math.isfinite(results["noise_mse"]) and results["n_samples"] == SIM["n_test"]
    ckpt = load_checkpoint(run_dir)
    torch.manual_seed(ckpt.cfg.seed)  # as the engine does before building the recipe: the initial weights
    initial = fmri_ldm.Recipe(ckpt.cfg, 0, 1, torch.device("cpu"), train=False).model.state_dict()
    assert ckpt.state.keys() == initial.keys()
    changed = {k for k in initial if not torch.equal(initial[k], ckpt.state[k])}
    assert changed and all(TRAINABLE.match(k) for k in changed)
    assert "unet.down_blocks.0.resnets.0.conv1.weight" not in changed and "conditioning.proj.weight" in changed


def test_generate_with_ddim_and_plms_resumably_and_score_the_images(run_dir, env, tmp_path, capsys):
    n_test, device = SIM["n_test"], torch.device("cpu")
    ddim, plms = tmp_path / "ddim", tmp_path / "plms"
    _, recipe = registry.from_checkpoint(run_dir, None, ["generation.scheduler=ddim"], device)
    assert reconstruct.generate(recipe, ddim, rank=1, world=2) == n_test // 2
    assert len(list(ddim.glob("*.png"))) == n_test  # 3 samples x 2 generations
    assert reconstruct.generate(recipe, ddim) == n_test // 2  # only the rest
    first = sorted(ddim.glob("*_1.png"))[0]
    first.unlink()
    assert reconstruct.generate(recipe, ddim) == 1  # resumes the one sample left unfinished
    names = sorted(p.name for p in ddim.glob("*.png"))
    assert len(names) == 2 * n_test and all(re.fullmatch(r"\d+_[01]\.png", n) for n in names)

    assert reconstruct.main(["--checkpoint", str(run_dir), "--out", str(plms), "--device", "cpu"]) == 0  # plms: the config's
    assert json.loads((plms / "reconstruction.json").read_text())["generation"]["scheduler"] == "plms"
    assert sorted(p.name for p in plms.glob("*.png")) == names
    assert any((plms / n).read_bytes() != (ddim / n).read_bytes() for n in names)

    report = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(run_dir), "--recons", str(plms), "--out", str(report), "--random-weights",
                      "--extractors", "alexnet,inception", "--n-way-classifier", "inception", "--device", "cpu"]) == 0
    r = json.loads((report / "results.json").read_text())
    for key in ("pixcorr", "ssim", "inception_50way_top1", "alexnet2", "inception"):
        assert math.isfinite(r[key]), key
    assert r["n_test"] == n_test and r["n_generations"] == 2 and 0 <= r["inception_50way_top1"] <= 100
    assert "forward_top1" not in r and not (report / "retrievals.png").exists() and (report / "reconstructions.png").exists()
    assert math.isfinite(r["noise_mse"]) and "noise_mse_shuffled" in r  # its own scores beside them
    # without --recons: the recipe's own held-out scores, and where the image metrics come from
    assert eval_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "e2"), "--extractors", ""]) == 0
    table = (tmp_path / "e2" / "table.md").read_text()
    assert "| noise_mse |" in table and "train.reconstruct" in table
