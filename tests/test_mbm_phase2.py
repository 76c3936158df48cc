"""DC-MAE phase 2 (train/recipes/mbm_phase2.py): the image MAE and its official-checkpoint key
map, the cross-attention model, masks, loss weights, frozen parts, and a short run whose
checkpoint the phase-1 loader reads back."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.checkpoint import load_checkpoint
from data.pretrained_weights import load_image_mae
from models.cross_mae import CrossModalMAE
from models.image_mae import ImageMAE
from models.mbm import MaskedBrainModel
from tests.test_mbm_model import _layer_params
from train import config, main
from train.config import ConfigError
from train.engine import make_optimizer, param_groups
from train.components.mbm_encoder import load_pretrained_encoder
from train.recipes.mbm_phase2 import Recipe

TINY = "train/configs/mbm_phase2_tiny.yaml"
# Small sizes on conftest's small dataset (subject 1: 300 voxels, 64 px stimuli).
SMALL = ["pretrained.fmri=random", "data.subject=1", "model.dim=32", "model.depth=1", "model.heads=2",
         "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2", "image_mae.dim=32",
         "image_mae.depth=1", "image_mae.heads=2", "image_mae.decoder_dim=16", "image_mae.decoder_heads=2",
         "cross.mlp_ratio=2.0", "train.batch_size=16", "eval.batch_size=16"]
TINY_IMAGE = {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.0,
              "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def _cfg(small_dataset, tmp_path, *overrides):
    return config.load(TINY, [f"data.root={small_dataset}", f"data.cache_dir={tmp_path / 'cache'}",
                              f"run_dir={tmp_path / 'run'}", *SMALL, *overrides])


def _recipe(small_dataset, tmp_path, *overrides, train=True) -> Recipe:
    torch.manual_seed(0)
    return Recipe(_cfg(small_dataset, tmp_path, *overrides), 0, 1, torch.device("cpu"), train)


class _Engine:
    """What a recipe's loss needs of the DeepSpeed engine, in float32."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def bfloat16_enabled(self):
        return False

    def fp16_enabled(self):
        return False


def _first_batch(recipe) -> dict:
    return next(iter(recipe.loader.epoch(0, 0)))[0]


# --- the image MAE ---------------------------------------------------------------------------


def test_vit_mae_base_parameter_count():
    """ViT-MAE base: the encoder is the paper's ~86M ViT-B (85,647,360 without the fixed
    positions), the 512 x 8 decoder 26,008,320; the official file adds the two fixed tables."""
    with torch.device("meta"):
        model = ImageMAE()
    encoder = (3 * 16 * 16 * 768 + 768) + 768 + 12 * _layer_params(768, 3072) + 2 * 768
    decoder = (768 * 512 + 512) + 512 + 8 * _layer_params(512, 2048) + 2 * 512 + (512 * 768 + 768)
    parts = model.parts()
    assert sum(p.numel() for p in parts["encoder"]) == encoder == 85_647_360
    assert sum(p.numel() for p in parts["decoder"]) == decoder == 26_008_320
    assert sum(p.numel() for p in model.parameters()) == encoder + decoder
    assert (model.n_patches, model.pos.shape, model.decoder_pos.shape) == (196, (1, 197, 768), (1, 197, 512))


def _mae_table(side: int, dim: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table as its code builds it: meshgrid(w, h) ("xy"), the first half of
    the channels from grid[0], the second from grid[1], an all-zero class row."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    table = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, dim]), table])).float()[None]


def _to_official(model: ImageMAE) -> dict:
    """Our state dict in the official MAE (timm) layout, written out by hand."""
    names = {"self_attn.in_proj_weight": "attn.qkv.weight", "self_attn.in_proj_bias": "attn.qkv.bias",
             "self_attn.out_proj.": "attn.proj.", "linear1.": "mlp.fc1.", "linear2.": "mlp.fc2."}
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("patch_embed.", "patch_embed.proj.")
        for ours, theirs in names.items():
            k = k.replace(ours, theirs)
        out[k] = v.clone()
    out["pos_embed"] = _mae_table(model.side, model.dim)
    out["decoder_pos_embed"] = _mae_table(model.side, model.decoder_dim)
    return out


def _reference(sd: dict, images: torch.Tensor, heads: int, decoder_heads: int, p: int) -> torch.Tensor:
    """A timm-style ViT-MAE forward written from the official keys (no masking): the
    predicted pixels of every patch."""
    def block(x, pre, h):
        b, n, d = x.shape
        y = F.layer_norm(x, (d,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], 1e-6)
        q, k, v = F.linear(y, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).view(b, n, 3, h, d // h).unbind(2)
        att = torch.einsum("bqhc,bkhc->bhqk", q, k).mul((d // h) ** -0.5).softmax(-1)
        o = torch.einsum("bhqk,bkhc->bqhc", att, v).reshape(b, n, d)
        x = x + F.linear(o, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"])),
                     sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        return x + y

    def n_blocks(prefix):
        return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:]
    x = torch.cat(((sd["cls_token"] + sd["pos_embed"][:, :1]).expand(len(x), -1, -1), x), dim=1)
    for i in range(n_blocks("blocks")):
        x = block(x, f"blocks.{i}.", heads)
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], 1e-6)
    x = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"]) + sd["decoder_pos_embed"]
    for i in range(n_blocks("decoder_blocks")):
        x = block(x, f"decoder_blocks.{i}.", decoder_heads)
    x = F.layer_norm(x, x.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], 1e-6)
    return F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]


def test_official_mae_checkpoint_key_map_round_trip(tmp_path):
    """A tiny model with every weight randomised, written in the official layout and loaded
    back: the same weights, the same outputs as the original and as a forward pass written
    from the official keys; a wrong position table or a decoder-less file is refused."""
    torch.manual_seed(0)
    source = ImageMAE(**TINY_IMAGE).eval()
    with torch.no_grad():
        for prm in source.parameters():
            prm.normal_(0, 0.2)
    official = _to_official(source)
    torch.save({"model": official, "epoch": 1600}, tmp_path / "mae.pth")
    loaded = load_image_mae(str(tmp_path / "mae.pth"), "image_mae.weights", seed=5, **TINY_IMAGE).eval()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, _, keep = loaded.encode(images)
        ours = loaded.decode(tokens, keep)
        theirs = _reference(official, images, heads=4, decoder_heads=2, p=8)
        torch.testing.assert_close(ours, source.decode(*source.encode(images)[::2]))
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert ours.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(loaded.unpatchify(loaded.patchify(images)), images)

    swapped = dict(official, pos_embed=official["pos_embed"][:, [0, *range(16, 0, -1)]])
    torch.save({"model": swapped}, tmp_path / "swapped.pth")
    with pytest.raises(ValueError, match="pos.*image_mae.weights"):
        load_image_mae(str(tmp_path / "swapped.pth"), "image_mae.weights", **TINY_IMAGE)
    torch.save({"model": {k: v for k, v in official.items() if not k.startswith("decoder")}}, tmp_path / "enc.pth")
    with pytest.raises(ValueError, match="has no decoder"):
        load_image_mae(str(tmp_path / "enc.pth"), "image_mae.weights", **TINY_IMAGE)


# --- the cross-modal model -------------------------------------------------------------------


def _cross_model(frozen=("image_encoder",)) -> CrossModalMAE:
    torch.manual_seed(1)
    fmri = MaskedBrainModel(300, patch_size=16, dim=32, depth=1, heads=2, decoder_dim=16, decoder_depth=1,
                            decoder_heads=2, mask_ratio=0.75)
    image = ImageMAE(**{**TINY_IMAGE, "depth": 1}, mask_ratio=0.5)
    return CrossModalMAE(fmri, image, layers=3, mlp_ratio=2.0, frozen=frozen)


def test_untrained_cross_layers_reconstruct_like_the_pretrained_maes():
    """The cross layers' output projections start at zero: each decoder's predictions equal
    those of its own MAE alone with the same masks; 3 layers each way."""
    model = _cross_model().eval()
    voxels, images = torch.randn(3, 300), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(voxels, images, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        alone_f = model.fmri(voxels, generator=g)
        alone_i = model.image(images, generator=g)
    torch.testing.assert_close(out["fmri_pred"], alone_f[1])
    torch.testing.assert_close(out["image_pred"], alone_i[1])
    torch.testing.assert_close(out["image_mse"], alone_i[0])
    assert len(model.fmri_cross) == len(model.image_cross) == 3
    assert model.fmri_cross[0].attn.k_proj_weight.shape == (16, 32)  # fMRI decoder 16 <- image encoder 32


def test_masks_drop_the_configured_share_of_patches(small_dataset, tmp_path):
    """fMRI: 300 voxels in 19 patches of 16, int(19 x 0.25) = 4 kept, 15 dropped (MAE's rule); image: 32 px in 16
    patches of 8, 8 dropped at 0.5; the config's ratios reach the model."""
    recipe = _recipe(small_dataset, tmp_path, train=False)
    voxels, images = torch.randn(4, 300), recipe.image_batch(recipe.data.split("val").image_ids[:4])
    out = recipe.model(voxels, images)
    assert (out["fmri_mask"].sum(1) == 15).all() and out["fmri_mask"].shape == (4, 19)
    assert (out["image_mask"].sum(1) == 8).all() and out["image_mask"].shape == (4, 16)
    assert len({tuple(m.tolist()) for m in out["image_mask"]}) > 1  # a mask per sample
    other = _recipe(small_dataset, tmp_path, "model.mask_ratio=0.5", "image_mae.mask_ratio=0.25",
                    "model.checkpoint_blocks=true", train=False)
    out = other.model(voxels, images)
    assert (out["fmri_mask"].sum(1) == 10).all() and (out["image_mask"].sum(1) == 4).all()
    assert other.model.fmri.checkpoint_blocks and not other.model.image.checkpoint_blocks


def test_loss_weights_are_read(small_dataset, tmp_path):
    """loss = fmri_recon x fMRI MSE + image_recon x image MSE on a fixed batch; raising
    loss.image_recon by 1 raises the loss by exactly the image MSE."""
    recipe = _recipe(small_dataset, tmp_path)
    engine, batch = _Engine(recipe.model), _first_batch(recipe)
    assert batch["voxels"].shape == (16, 300) and batch["image_ids"].shape == (16,)
    torch.manual_seed(7)
    loss, logged = recipe.loss(engine, batch, 0, 0)
    assert loss.item() == pytest.approx(0.25 * logged["fmri_recon"] + 1.5 * logged["image_recon"], rel=1e-6)
    recipe.cfg.loss.image_recon = 2.5
    torch.manual_seed(7)
    higher, again = recipe.loss(engine, batch, 0, 0)
    assert again["image_recon"] == logged["image_recon"] > 0
    assert higher.item() - loss.item() == pytest.approx(logged["image_recon"], rel=1e-5)
    recipe.cfg.loss.fmri_recon = 0.0
    torch.manual_seed(7)
    assert recipe.loss(engine, batch, 0, 0)[0].item() == pytest.approx(2.5 * logged["image_recon"], rel=1e-6)


def _snapshot(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("freeze", [["image_encoder"], ["image_encoder", "fmri_decoder"]])
def test_frozen_parts_stay_and_the_rest_train(small_dataset, tmp_path, freeze):
    """Two AdamW steps through the engine's optimizer: every tensor of a frozen part is
    unchanged, every tensor of a trained part changed (the zero-started cross layers get
    gradients from the second step)."""
    recipe = _recipe(small_dataset, tmp_path, f"freeze={json.dumps(freeze).replace(' ', '')}")
    model, parts = recipe.model, recipe.model.parts()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in param_groups(model, recipe.cfg) for p in g["params"]) == trainable
    before = {name: _snapshot(ps) for name, ps in parts.items()}
    opt = make_optimizer(model, recipe.cfg, {})
    engine, batch = _Engine(model), _first_batch(recipe)
    for _ in range(2):
        opt.zero_grad()
        recipe.loss(engine, batch, 0, 0)[0].backward()
        opt.step()
    for name, params in parts.items():
        changed = [not torch.equal(a, p) for a, p in zip(before[name], params)]
        if name in freeze:
            assert not any(changed) and not any(p.requires_grad for p in params), name
        else:
            assert all(changed), (name, changed.count(False))
    with pytest.raises(ConfigError, match="freeze: unknown part 'decoder'"):
        _recipe(small_dataset, tmp_path, "freeze=[decoder]", train=False)


def test_block_checkpointing_gives_the_same_gradients():
    model = _cross_model(frozen=())
    voxels, images = torch.randn(2, 300), torch.randn(2, 3, 32, 32)
    grads = []
    with torch.no_grad():  # non-zero cross outputs, so gradients cross between the modalities
        for layer in [*model.fmri_cross, *model.image_cross]:
            layer.attn.out_proj.weight.normal_(0, 0.1)
    for flag in (False, True):
        model.fmri.checkpoint_blocks = model.image.checkpoint_blocks = flag
        model.zero_grad()
        out = model(voxels, images, generator=torch.Generator().manual_seed(3))
        (out["fmri_mse"] + out["image_mse"]).backward()
        grads.append([p.grad.clone() for p in (model.fmri.patch_embed.weight, model.image.patch_embed.weight,
                                               model.image_cross[0].attn.k_proj_weight)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


def test_bf16_parameters_with_float32_position_buffers():
    """DeepSpeed bf16 casts parameters only (buffers, here the fixed position tables, stay
    float32): the forward pass runs in bf16 and is close to float32."""
    model = _cross_model().eval()
    voxels, images = torch.randn(2, 300), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(voxels, images, generator=torch.Generator().manual_seed(2))
        for prm in model.parameters():
            prm.data = prm.data.bfloat16()
        out = model(voxels.bfloat16(), images.bfloat16(), generator=torch.Generator().manual_seed(2))
    assert model.fmri.pos.dtype == torch.float32 and out["image_pred"].dtype == torch.bfloat16
    torch.testing.assert_close(out["fmri_mse"], ref["fmri_mse"], rtol=0.05, atol=0.05)
    torch.testing.assert_close(out["image_mse"], ref["image_mse"], rtol=0.05, atol=0.05)


# --- runs ----------------------------------------------------------------------------------


def test_short_run_writes_a_checkpoint_the_phase1_loader_reads(small_dataset, tmp_path):
    """One epoch from a random fMRI MAE (6 steps); the run's fMRI MAE loads with
    load_pretrained_encoder, and as pretrained.fmri of a new phase-2 recipe (whose model must
    match the run's)."""
    run_dir = tmp_path / "run"
    args = ["--config", TINY, f"data.root={small_dataset}", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run_dir}",
            *SMALL, "train.epochs=1", "train.warmup_epochs=0", "ds.bf16.enabled=false"]
    assert main.main(args) == 0
    results = json.loads((run_dir / "test_results.json").read_text())
    keys = ("fmri_masked_mse", "image_masked_mse", "fmri_masked_mse_other_image", "image_masked_mse_other_fmri")
    assert all(math.isfinite(results[k]) and results[k] > 0 for k in keys), results
    assert results["n_samples"] == 40 and results["voxel_fit"] == "none" and results["step"] == 6
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 6 and {"fmri_recon", "image_recon"} <= set(train[-1])

    encoder = load_pretrained_encoder(str(run_dir), "pretrained.fmri")
    state = load_checkpoint(run_dir).state
    assert isinstance(encoder, MaskedBrainModel) and encoder.n_voxels == 300 and encoder.dim == 32
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state[f"fmri.{k}"]), k

    again = _recipe(small_dataset, tmp_path, f"pretrained.fmri={run_dir}", train=False)
    assert again.cfg.model.n_voxels == 300
    assert torch.equal(again.model.fmri.blocks[0].linear1.weight, encoder.blocks[0].linear1.weight)
    with pytest.raises(ConfigError, match=r"model.dim=64, but the pretrained run .* has 32"):
        _recipe(small_dataset, tmp_path, f"pretrained.fmri={run_dir}", "model.dim=64", train=False)


def test_missing_weights_are_one_line_errors_naming_the_key(small_dataset, tmp_path, capsys):
    base = ["--config", TINY, f"data.root={small_dataset}", f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}", *SMALL, "ds.bf16.enabled=false"]
    assert main.main([*base, f"image_mae.weights={tmp_path / 'mae_visualize_vit_base.pth'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "mae_visualize_vit_base.pth" in err and "image_mae.weights" in err
    assert main.main([*base, f"pretrained.fmri={tmp_path / 'no_run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "no_run" in err and "pretrained.fmri" in err
    assert main.main([*base, "image_mae.weights=''"]) == 2
    assert "image_mae.weights is not set" in capsys.readouterr().err
