"""MindEye 1's released checkpoint layout maps onto our models, tensor for tensor."""
import pytest
import torch

from train.checkpoint import CheckpointError, load_checkpoint
from models.diffusion_prior import PriorNetwork
from models.lowlevel import LowLevelDecoder
from models.mindeye import MindEye, MindEyeBackbone
from models.mindeye1_keys import from_mindeye1

V, T, D, H, DEPTH = 40, 5, 32, 48, 2


def _reference_high_level() -> dict[str, torch.Tensor]:
    """Random tensors under MindEye 1's key names (BrainNetwork + dalle2 DiffusionPrior)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"voxel2clip.lin0.0.weight": r(H, V), "voxel2clip.lin0.0.bias": r(H),
          "voxel2clip.lin0.1.weight": r(H), "voxel2clip.lin0.1.bias": r(H),
          "voxel2clip.lin1.weight": r(T * D, H), "voxel2clip.lin1.bias": r(T * D)}
    for i in range(4):
        sd |= {f"voxel2clip.mlp.{i}.0.weight": r(H, H), f"voxel2clip.mlp.{i}.0.bias": r(H),
               f"voxel2clip.mlp.{i}.1.weight": r(H), f"voxel2clip.mlp.{i}.1.bias": r(H)}
    proj = {0: D, 2: (16, D), 3: 16, 5: (16, 16), 6: 16, 8: (D, 16)}  # LN, Linear, LN, Linear, LN, Linear
    for j, shape in proj.items():
        if isinstance(shape, tuple):
            sd |= {f"voxel2clip.projector.{j}.weight": r(*shape), f"voxel2clip.projector.{j}.bias": r(shape[0])}
        else:
            sd |= {f"voxel2clip.projector.{j}.weight": r(shape), f"voxel2clip.projector.{j}.bias": r(shape)}
    sd |= {"net.learned_query": r(T, D), "net.null_brain_embeds": r(T, D), "net.null_image_embed": r(T, D),
           "net.to_time_embeds.0.1.net.0.0.weight": r(2 * D, D), "net.to_time_embeds.0.1.net.0.0.bias": r(2 * D),
           "net.to_time_embeds.0.1.net.1.0.weight": r(2 * D, 2 * D), "net.to_time_embeds.0.1.net.1.0.bias": r(2 * D),
           "net.to_time_embeds.0.1.net.2.weight": r(D, 2 * D), "net.to_time_embeds.0.1.net.2.bias": r(D),
           "net.causal_transformer.rel_pos_bias.relative_attention_bias.weight": r(32, 2),
           "net.causal_transformer.norm.g": r(D), "net.causal_transformer.project_out.weight": r(D, D),
           "noise_scheduler.betas": r(100), "noise_scheduler.alphas_cumprod": r(100)}
    for i in range(DEPTH):
        a, f = f"net.causal_transformer.layers.{i}.0", f"net.causal_transformer.layers.{i}.1"
        sd |= {f"{a}.norm.g": r(D), f"{a}.null_kv": r(2, 16), f"{a}.to_q.weight": r(32, D), f"{a}.to_kv.weight": r(32, D),
               f"{a}.to_out.0.weight": r(D, 32), f"{a}.to_out.1.g": r(D), f"{a}.rotary_emb.freqs": r(8),
               f"{f}.0.g": r(D), f"{f}.1.weight": r(8 * D, D), f"{f}.5.weight": r(D, 4 * D)}
    return sd


def _ours() -> MindEye:
    return MindEye(MindEyeBackbone(V, T, D, hidden=H, proj_hidden=16),
                   PriorNetwork(D, T, DEPTH, heads=2, dim_head=16))


def test_high_level_checkpoint_loads_strictly_and_keeps_every_tensor():
    reference = _reference_high_level()
    model = _ours()
    model.load_state_dict(from_mindeye1(reference))  # strict: every key of ours is filled, no key left over
    ours = model.state_dict()
    assert torch.equal(ours["backbone.trunk.blocks.3.net.0.weight"], reference["voxel2clip.mlp.3.0.weight"])
    assert torch.equal(ours["prior.layers.1.1.4.weight"], reference["net.causal_transformer.layers.1.1.5.weight"])
    assert torch.equal(ours["prior.time_embedding.mlp.2.bias"], reference["net.to_time_embeds.0.1.net.1.0.bias"])
    assert torch.equal(ours["prior.rel_pos_bias.weight"],
                       reference["net.causal_transformer.rel_pos_bias.relative_attention_bias.weight"])


def test_low_level_checkpoint_loads_strictly():
    model = LowLevelDecoder(V, hidden=H, n_blocks=4, map_channels=16, map_side=2, decoder_channels=(16, 32),
                            norm_groups=8, feature_dim=24, feature_hidden=32)
    rename = {"trunk.stem.": "lin0.", "to_map.": "lin1.", "feature_projector.": "maps_projector."}
    reference = {}
    for key, value in model.state_dict().items():
        new = key.replace("trunk.blocks.", "mlp.").replace(".net.", ".")
        for ours, theirs in rename.items():
            new = new.replace(ours, theirs)
        reference[new] = torch.randn_like(value)
    assert "mlp.2.0.weight" in reference and "maps_projector.6.bias" in reference
    model.load_state_dict(from_mindeye1(reference))
    assert torch.equal(model.state_dict()["trunk.blocks.2.net.0.weight"], reference["mlp.2.0.weight"])


def test_released_file_is_converted_on_load_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "last.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in _reference_high_level().items()}}, path)
    config = tmp_path / "c.yaml"
    config.write_text("recipe: mindeye\n")
    state = load_checkpoint(path, config).state
    _ours().load_state_dict(state)
    torch.save({"voxel2clip.lin0.0.weight": torch.zeros(1), "voxel2clip.surprise": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="voxel2clip.surprise"):
        load_checkpoint(path, config)
