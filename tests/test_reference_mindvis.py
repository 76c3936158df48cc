"""MinD-Vis' and DC-MAE's released checkpoints against the golden outputs of their own code
(tests/fixtures/reference/make_mindvis.py, make_dcmae.py): each file, written byte for byte as the
original's training script saves it (pickled config classes included), is read through our import
path and reproduces the original's outputs within 1e-5 (of the output's scale where it exceeds 1)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from data.compvis_ldm import load_unet, load_vq, noise_schedule
from models import mindvis_keys
from models.dcmae_cross import CrossEncoder, cross_entries
from models.fmri_ldm import FMRILDM, sampler
from models.mae import masked_mse
from models.mindvis_keys import from_fmri_mae, split_cross
from tests.conftest import load_reference
from tests.test_reference_mindeye2 import close
from train.checkpoint import load_checkpoint
from train.components.mbm_encoder import ModelConfig, build_encoder, load_pretrained_encoder


@pytest.fixture(scope="module")
def mind_vis():
    return load_reference("mindvis.pt.xz")


@pytest.fixture(scope="module")
def dc_mae():
    return load_reference("dcmae.pt.xz")


def write(tmp_path, data: torch.Tensor, name: str):
    path = tmp_path / name
    path.write_bytes(data.numpy().tobytes())
    return path


def check_case(mae, voxels, case):
    """Our encoder and decoder on the original's mask noise: its tokens (kept patches in the same
    order), mask, predictions and masked-patch loss."""
    with torch.no_grad():
        tokens, mask, keep = mae.encode(voxels, case["mask_ratio"], noise=case["noise"])
        pred = mae.decode(tokens, keep)
    close(tokens, case["latent"])
    assert torch.equal(mask, case["mask"])
    close(pred, case["pred"])
    close(masked_mse(pred, mae.patchify(voxels), mask), case["loss"])


def test_mind_vis_fmri_encoder_pth_reproduces_stage_a(mind_vis, tmp_path):
    """fmri_encoder.pth (with its optimizer, scaler and pickled Config_MBM_fMRI) as `encoder.checkpoint`
    and as the mbm recipe's model: the sizes from its keys and config, LayerNorm eps 1e-5, MinD-Vis'
    position table and masking rule (int(8 x 0.25) = 2 and int(8 x 0.5) = 4 kept)."""
    a = mind_vis["stage_a"]
    path = write(tmp_path, mind_vis["fmri_encoder_pth"], "fmri_encoder.pth")
    ckpt = load_checkpoint(path)
    assert ckpt.cfg.recipe == "mbm"
    m = ckpt.cfg.model
    assert (m.n_voxels, m.dim, m.depth, m.heads, m.decoder_dim, m.decoder_depth, m.decoder_heads) == (128, 32, 2, 4, 16, 1, 2)
    mae = load_pretrained_encoder(str(path), "encoder.checkpoint").eval()
    for case in a["cases"]:
        check_case(mae, a["voxels"][:, 0], case)


def test_mind_vis_finetuned_pth_reproduces_stage_b(mind_vis, tmp_path, monkeypatch):
    """finetuned.pth: the encoder without class token, the channel and dim mappers, the time
    conditioning, the UNet's noise prediction (diffusers' UNet under converted names), the VQ-f4
    first stage (diffusers' VQModel: decoding quantises, encoding does not) and 5 PLMS steps. The
    file does not record the encoder's heads (MinD-Vis' 16 are assumed; the fixture has 4)."""
    b = mind_vis["stage_b"]
    path = write(tmp_path, mind_vis["finetuned_pth"], "finetuned.pth")
    ckpt = load_checkpoint(path, overrides=["encoder.model.heads=4"])
    cfg = ckpt.cfg
    assert (cfg.recipe, cfg.ldm.conditioning, cfg.ldm.weights, cfg.ldm.context_dim) == ("fmri_ldm", "mind_vis", str(path), 24)
    encoder = build_encoder(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.encoder.model, {"decoder_depth": 0}))
    unet = load_unet(str(path), "ldm.weights", "mind_vis", 8, 24, with_weights=False)
    model = FMRILDM(encoder, unet, cfg.ldm.n_context, "mind_vis").eval()
    ckpt.load_into(model)
    voxels = b["fmri"][:, 0]
    with torch.no_grad():
        close(model.encoder.patch_tokens(voxels), b["tokens"])
        context, time_term = model.condition(voxels)
        close(context, b["cond"])
        close(time_term, b["time_cond"][:, 0])
        close(model.denoise(b["x_noisy"], b["t"], context, time_term), b["eps"])
        vq = load_vq(str(path), "ldm.weights")
        close(vq.decode(b["z"]).sample, b["decoded"])
        close(vq.encode(b["image"]).latents, b["encoded"])
        plms = sampler("plms", noise_schedule(str(path), "ldm.weights"))
        plms.set_timesteps(len(b["plms_timesteps"]))
        assert sorted(set(plms.timesteps.tolist()), reverse=True) == b["plms_timesteps"].tolist()
        latents = b["plms_x_T"].clone()
        for t in plms.timesteps:
            latents = plms.step(model.denoise(latents, t.expand(len(latents)), context, time_term), t, latents).prev_sample
    close(latents, b["plms_samples"])
    # the same file as `encoder.checkpoint`: its stage-B encoder
    monkeypatch.setattr(mindvis_keys, "DEFAULT_HEADS", 4)
    encoder = load_pretrained_encoder(str(path), "encoder.checkpoint")
    assert encoder.decoder_embed is None
    close(encoder.patch_tokens(voxels).detach(), b["tokens"])


def test_dc_mae_phase_1_checkpoint_reproduces_its_encoder(dc_mae, tmp_path):
    """Phase 1's checkpoint.pth (Config_MBM_fMRI_contrast pickled; 8 decoder blocks)."""
    path = write(tmp_path, dc_mae["phase1_pth"], "checkpoint.pth")
    mae = load_pretrained_encoder(str(path), "encoder.checkpoint").eval()
    assert len(mae.decoder_blocks) == 8
    check_case(mae, dc_mae["voxels"][:, 0], {"mask_ratio": dc_mae["mask_ratio"], "noise": dc_mae["mask_noise"],
                                             **dc_mae["phase1"]})


def test_dc_mae_phase_2_checkpoint_reproduces_its_encoder_and_cross_layers(dc_mae, tmp_path):
    """Phase 2's checkpoint.pth (config_merge with a pickled ViTMAEConfig): the fMRI MAE read as
    `encoder.checkpoint` computes phase 2 without image support; models/dcmae_cross.py adds its
    cross layers (eps 1e-12: the small-input case fails with 1e-5), with and without the residual."""
    p2, voxels, noise = dc_mae["phase2"], dc_mae["voxels"][:, 0], dc_mae["mask_noise"]
    path = write(tmp_path, dc_mae["phase2_pth"], "checkpoint.pth")
    mae = load_pretrained_encoder(str(path), "encoder.checkpoint").eval()
    case = {"mask_ratio": dc_mae["mask_ratio"], "noise": noise}
    check_case(mae, voxels, {**case, "latent": p2["latent_no_support"], "pred": p2["pred_no_support"],
                             "mask": p2["mask"], "loss": masked_mse(p2["pred_no_support"], mae.patchify(voxels), p2["mask"])})
    with torch.no_grad():  # nothing masked, the tokens in the order of the original's own (unrecorded) noise
        unmasked, reference = mae.encode(voxels, 0.0)[0], p2["encoder_only_mask_ratio_0"]
        close(unmasked[:, 0], reference[:, 0])
        nearest = torch.cdist(reference[:, 1:], unmasked[:, 1:]).min(-1).values
        assert nearest.max() < 1e-5 * reference.abs().max()
        close(mae.patch_tokens(voxels), dc_mae["ldm_encoder"]["global_pool_False"])

    mae_state, cross = split_cross(dc_mae["phase2_state_dict"])
    ours, tables = from_fmri_mae(mae_state)
    n_layers = len({k.split(".")[1] for k in cross if k.startswith("cross_blocks.")})
    crossed = CrossEncoder(mae, n_layers, heads=12, mlp=cross["cross_blocks.0.intermediate.dense.weight"].shape[0]).eval()
    crossed.load_state_dict({**{f"mae.{k}": v for k, v in ours.items()}, **cross_entries(cross)})
    block = dc_mae["cross_block0"]
    with torch.no_grad():
        for x, out in ((block["x"], block["out"]), (block["x_small"], block["out_small"])):
            close(crossed.layers[0](x, block["img_support"]), out)
        tokens, mask, keep = crossed.encode(voxels, dc_mae["img_support"], noise=noise)
        close(tokens, p2["latent"])
        close(mae.decode(tokens, keep), p2["pred"])
        crossed.residual = False
        close(crossed.encode(voxels, dc_mae["img_support"], noise=noise)[0], p2["latent_no_residual"])
    assert torch.equal(mask, p2["mask"]) and set(tables) == {"pos", "decoder_pos"}
