"""OpenAI's CLIP and MindEye 1's CLIP targets against golden outputs of the original code
(tests/fixtures/reference/make_openai_clip.py): a tiny random CLIP, in each file format users
hold, read by our reader into the target encoder, the CLIP metric's extractor and CLIP-MUSED's
model, which then compute what the original computed, within 1e-5."""
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from data.clip_weights import config_weights
from eval.features import CLIPEmbedding, WeightsMissing, build_extractor, load_clip_visual
from models.clip_image import build_visual, clip_preprocess
from models.clip_levels import build_clip_levels
from tests.conftest import load_reference
from train.config import ConfigError
from train.components.clip_targets import ClipConfig, TinyViTConfig, clip_encoder

FORMATS = ["torchscript", "state_dict", "hf_bin", "hf_safetensors"]


def close(ours, reference):
    """Agreement within 1e-5 of the reference output's scale (its largest magnitude, at least 1)."""
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * max(1.0, reference.abs().max().item()))


@pytest.fixture(scope="module")
def ref():
    return load_reference("openai_clip.pt.xz")


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """The fixture's weights as the files users hold: OpenAI's TorchScript release, a bare
    state dict, and Hugging Face's pytorch_model.bin / model.safetensors beside config.json."""
    root = tmp_path_factory.mktemp("clip_weights")
    paths = {"torchscript": root / "ViT-tiny.pt", "state_dict": root / "state_dict.pt",
             "hf_bin": root / "hf_bin" / "pytorch_model.bin", "hf_safetensors": root / "hf_st" / "model.safetensors"}
    paths["torchscript"].write_bytes(ref["torchscript"].numpy().tobytes())
    torch.save(ref["openai_state"], paths["state_dict"])
    for name in ("hf_bin", "hf_safetensors"):
        paths[name].parent.mkdir()
        (paths[name].parent / "config.json").write_text(ref["hf_config"])
    torch.save(ref["hf_state"], paths["hf_bin"])
    save_file({k: v.contiguous() for k, v in ref["hf_state"].items()}, paths["hf_safetensors"])
    return paths


def vit_sizes(ref) -> dict:
    s = ref["sizes"]
    return {"image_size": s["image_resolution"], "patch_size": s["vision_patch_size"], "width": s["vision_width"],
            "layers": s["vision_layers"], "heads": s["vision_width"] // 64, "output_dim": s["embed_dim"]}


def clip_config(ref, path, **overrides):
    """A MindEye `clip:` config block for the fixture's sizes and weights file."""
    c = OmegaConf.structured(ClipConfig(arch="tiny", weights=str(path), tiny=TinyViTConfig(**vit_sizes(ref))))
    return OmegaConf.merge(c, overrides)


def activation(name: str) -> str:
    """A bare state dict does not say its activation; the config must."""
    return "quick_gelu" if name == "state_dict" else "auto"


@pytest.mark.parametrize("name", FORMATS)
def test_targets_are_mindeye1s(ref, files, name):
    encoder = clip_encoder(clip_config(ref, files[name], activation=activation(name)))
    close(encoder(ref["images"]), ref["mindeye1_tokens"])
    pooled = clip_encoder(clip_config(ref, files[name], activation=activation(name), target="pooled"))
    close(pooled(ref["images"])[:, 0], F.normalize(ref["openai_image_embedding"], dim=-1))


@pytest.mark.parametrize("name", FORMATS)
def test_clip_metric_is_openai_encode_image(ref, files, name):
    extractor = CLIPEmbedding(load_clip_visual(files[name], build_visual("tiny", True, vit_sizes(ref)))).eval()
    with torch.no_grad():
        close(extractor(ref["metric_pixels"])["clip"], ref["metric_embedding"])


@pytest.mark.parametrize("name", ["torchscript", "hf_safetensors"])
def test_clip_mused_model_is_openai_clip(ref, files, name):
    s = ref["sizes"]
    tiny = {"embed_dim": s["embed_dim"],
            "vision": {k: v for k, v in vit_sizes(ref).items() if k != "output_dim"},
            "text": {"context_length": s["context_length"], "vocab_size": s["vocab_size"], "width": s["transformer_width"],
                     "layers": s["transformer_layers"], "heads": s["transformer_heads"]}}
    state, quick_gelu = config_weights(str(files[name]), "auto", ConfigError)
    levels = build_clip_levels("tiny", state, quick_gelu, tiny=tiny)
    tokens = levels.tokenizer(ref["captions"])
    assert torch.equal(tokens, ref["text"])  # open_clip's tokenizer is OpenAI's
    with torch.no_grad():
        close(levels.model.encode_image(ref["metric_pixels"]), ref["metric_embedding"])
        close(levels.model.encode_text(tokens), ref["text_embedding"])


def test_gelu_and_antialiasing_would_not_match(ref, files):
    """What the defaults fix: GELU instead of QuickGELU, or an antialiased resize, moves the
    targets far beyond the tolerance."""
    gelu = clip_encoder(clip_config(ref, files["state_dict"], activation="gelu"))(ref["images"])
    assert (gelu - ref["mindeye1_tokens"]).abs().max() > 1e-3
    encoder = clip_encoder(clip_config(ref, files["state_dict"], activation="quick_gelu"))
    encoder.preprocess = lambda images: clip_preprocess(images, encoder.image_size, encoder.mean, encoder.std,
                                                        antialias=True)
    assert (encoder(ref["images"]) - ref["mindeye1_tokens"]).abs().max() > 1e-3


def test_activation_must_agree_with_the_file(ref, files, tmp_path):
    with pytest.raises(ConfigError, match="OpenAI's TorchScript release says quick_gelu, but clip.activation=gelu"):
        clip_encoder(clip_config(ref, files["torchscript"], activation="gelu"))
    with pytest.raises(ConfigError, match="set clip.activation=quick_gelu or clip.activation=gelu"):
        clip_encoder(clip_config(ref, files["state_dict"]))
    gelu = tmp_path / "laion"
    gelu.mkdir()
    (gelu / "pytorch_model.bin").write_bytes(files["hf_bin"].read_bytes())
    config = json.loads(files["hf_bin"].with_name("config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu"
    (gelu / "config.json").write_text(json.dumps(config))
    assert config_weights(str(gelu / "pytorch_model.bin"), "auto", ConfigError)[1] is False
    with pytest.raises(ConfigError, match=r"hidden_act gelu\) says gelu, but clip.activation=quick_gelu"):
        config_weights(str(gelu / "pytorch_model.bin"), "quick_gelu", ConfigError)
    with pytest.raises(WeightsMissing, match="not OpenAI's CLIP"):
        load_clip_visual(gelu / "pytorch_model.bin", build_visual("tiny", True, vit_sizes(ref)))


def test_bad_files_are_one_line_errors(ref, files, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not weights")
    with pytest.raises(ConfigError) as e:
        clip_encoder(clip_config(ref, bad))
    message = str(e.value)
    assert "\n" not in message and str(bad) in message and "clip.weights" in message
    assert "TorchScript" in message and "open_clip" in message and "Hugging Face" in message
    with pytest.raises(WeightsMissing) as e:
        load_clip_visual(bad, build_visual("tiny", True, vit_sizes(ref)))
    assert str(bad) in str(e.value) and "--weights clip=PATH" in str(e.value)
    with pytest.raises(WeightsMissing, match="not OpenAI's CLIP ViT-L/14"):  # the tiny CLIP is not ViT-L/14
        build_extractor("clip", files["torchscript"])
    with pytest.raises(ConfigError, match="clip.weights for clip.arch=tiny") as e:
        clip_encoder(clip_config(ref, files["torchscript"], tiny={"width": 64}))
    assert "visual.class_embedding is [128] in the weights, [64] in the model" in str(e.value)
