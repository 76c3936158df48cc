"""MindEye 2's released checkpoints (`train_logs/<name>/last.pth`): read without DeepSpeed or the
training objects they pickle, their config taken from their keys (and folder name), mapped
strictly onto our model, and refused when they pickle anything else."""
from __future__ import annotations

import json
import os
import pickle
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch

from data.released_pickle import Inert, load_released
from eval.main import main as eval_main
from models.mindeye2 import MindEye2, SubjectRidge
from models.mindeye2_keys import from_mindeye2
from tests.conftest import ROOT, load_reference
from tests.test_reference_mindeye2 import backbone_of, close, padded, prior_of
from train import config, registry
from train.checkpoint import CheckpointError, load_checkpoint

FAKE_MODULE = "deepspeed.runtime.something"  # registered only while a file is written
# The fixture's sizes on the simulated brain: 2 subjects of 20 and 24 voxels, 4 CLIP tokens of 16 (a ViT
# of width 16 on 32 px images in 16 px patches); the blurry branch's latents are 4 x 28 x 28 (a 112 px VAE).
TINY_CONFIG = ROOT / "train/configs/mindeye2_tiny.yaml"
TINY = ["data.simulator.n_subjects=2", "data.simulator.voxels=[20,24]", "data.simulator.n_train=8",
        "data.simulator.n_val=2", "data.simulator.n_test=6", "data.simulator.image_size=32", "clip.tiny.image_size=32",
        "clip.tiny.width=16", "clip.tiny.layers=1", "prior.sample_steps=2"]


class LossScaler:
    """Like DeepSpeed's DynamicLossScaler: an object rebuilt from its __dict__ (NEWOBJ, BUILD)."""

    def __init__(self):
        self.cur_scale, self.dtype = 65536.0, torch.float16


class ZeroStage:
    """Like DeepSpeed's ZeroStageEnum: rebuilt by calling its class (REDUCE)."""

    def __init__(self, value: int):
        self.value = value

    def __reduce__(self):
        return ZeroStage, (self.value,)


@dataclass
class FragmentAddress:
    numel: int
    start: int


class Evil:
    """Runs a shell command when unpickled by pickle itself."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


for _cls in (LossScaler, ZeroStage, FragmentAddress):
    _cls.__module__ = FAKE_MODULE


def training_objects() -> dict:
    """The non-model entries of MindEye 2's `last.pth` (Train.ipynb's save_ckpt under accelerate with
    DeepSpeed ZeRO-2, torch 2.1): the ZeRO optimizer's state, the OneCycleLR state (whose
    `anneal_func`, a static method, pickles as getattr(OneCycleLR, ...)), the logged losses."""
    weight = torch.nn.Parameter(torch.randn(3, 2))
    adam = torch.optim.AdamW([weight], lr=3e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=3e-4, total_steps=10, final_div_factor=1000)
    weight.sum().backward()
    adam.step()
    schedule.step()
    lr_state = {**schedule.state_dict(), "anneal_func": torch.optim.lr_scheduler.OneCycleLR._annealing_cos}
    zero = {"loss_scaler": LossScaler(), "dynamic_loss_scale": True, "overflow": False, "clip_grad": 1.0,
            "base_optimizer_state": adam.state_dict(), "single_partition_of_fp32_groups": [weight.detach().flatten()],
            "zero_stage": ZeroStage(2), "group_paddings": [0], "partition_count": [1], "ds_version": "0.13.1",
            "param_slice_mappings": [OrderedDict(weight=FragmentAddress(6, 0))]}
    return {"epoch": 149, "optimizer_state_dict": zero, "lr_scheduler": lr_state,
            "train_losses": [np.float64(0.5), 0.25], "test_losses": [0.5], "lrs": [3e-4]}


def save_released(path, state: dict, **extra) -> None:
    """`state` as MindEye 2 saved it, beside its training objects, into `path`."""
    fake = types.ModuleType(FAKE_MODULE)
    for cls in (LossScaler, ZeroStage, FragmentAddress):
        setattr(fake, cls.__name__, cls)
    sys.modules[FAKE_MODULE] = fake
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**training_objects(), "model_state_dict": state, **extra}, path)
    finally:
        del sys.modules[FAKE_MODULE]


@pytest.fixture(scope="module")
def reference():
    return load_reference("mindeye2_model.pt.xz")


@pytest.fixture
def released(reference, tmp_path):
    path = tmp_path / "train_logs" / "tiny_two_subjects" / "last.pth"
    save_released(path, reference["state_dict"])
    return path


def test_the_file_needs_the_restricted_reader(released, reference):
    """The test file holds what the released ones do: plain weights-only loading refuses it."""
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(released))
    assert {f"{FAKE_MODULE}.LossScaler", f"{FAKE_MODULE}.ZeroStage", f"{FAKE_MODULE}.FragmentAddress",
            "torch.optim.lr_scheduler.OneCycleLR", "builtins.getattr"} <= names
    assert any(n.startswith("numpy.") for n in names)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(released, weights_only=True)
    with pytest.raises(ModuleNotFoundError, match=FAKE_MODULE):  # what unpickling it in full would need
        torch.load(released, weights_only=False)
    obj = load_released(released, CheckpointError, "unreadable")
    zero = obj["optimizer_state_dict"]
    assert all(isinstance(zero[k], Inert) for k in ("loss_scaler", "zero_stage"))
    assert isinstance(obj["lr_scheduler"]["anneal_func"], Inert) and isinstance(obj["train_losses"][0], Inert)
    key = "ridge.linears.1.weight"
    assert torch.equal(obj["model_state_dict"][key], reference["state_dict"][key])


@torch.no_grad()
def test_a_released_file_loads_strictly_and_reproduces_the_reference_outputs(released, reference):
    modules = set(sys.modules)
    ckpt = load_checkpoint(released)  # no --config: the pretraining paper config, sizes from the keys
    assert not [m for m in set(sys.modules) - modules if m.startswith("deepspeed")]
    cfg = ckpt.cfg
    assert (cfg.recipe, cfg.model.hidden, cfg.model.n_blocks, cfg.model.blurry) == ("mindeye2", 32, 2, True)
    assert (cfg.prior.enabled, cfg.prior.depth, cfg.prior.heads, cfg.prior.dim_head) == (True, 2, 2, 40)
    assert cfg.init.checkpoint == ""
    net = MindEye2(SubjectRidge(reference["ridge_kwargs"]["input_sizes"], cfg.model.hidden),
                   backbone_of(reference["backbone_kwargs"]), prior_of(reference["prior_kwargs"]))
    ckpt.load_into(net)
    net.eval()
    voxels, rows = padded(reference["voxels"])
    close(net.ridge(voxels, rows), reference["voxel_ridge"])
    tokens, projected, (latents, features) = net(voxels, rows)
    close(tokens, reference["backbone"])
    close(projected, reference["clip_voxels"])
    close(latents, reference["blurry_latents"])
    close(features, reference["blurry_aux"])


def test_voxel_counts_that_differ_from_the_datasets_are_one_error_naming_key_and_shapes(released, reference):
    ckpt = load_checkpoint(released)
    net = MindEye2(SubjectRidge([20, 30], 32), backbone_of(reference["backbone_kwargs"]),
                   prior_of(reference["prior_kwargs"]))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_into(net)
    assert "ridge.linears.1.weight is [32, 24] in the weights, [32, 30] in the model" in str(e.value)
    assert "\n" not in str(e.value)


def nsd_like(n_subjects: int, hidden: int, blurry: bool, prior: bool) -> dict[str, torch.Tensor]:
    """Zero tensors under MindEye 2's key names, with the shapes its layout is read from."""
    state = {}
    for s in range(n_subjects):
        state |= {f"ridge.linears.{s}.weight": torch.zeros(hidden, 10 + s),
                  f"ridge.linears.{s}.bias": torch.zeros(hidden)}
    for b in range(4):
        state[f"backbone.mixer_blocks1.{b}.0.weight"] = torch.zeros(hidden)
    state["backbone.backbone_linear.weight"] = torch.zeros(8, hidden)
    if blurry:
        state["backbone.blin1.weight"] = torch.zeros(1)
    if prior:
        for layer in range(6):
            a = f"diffusion_prior.net.causal_transformer.layers.{layer}.0."
            state |= {f"{a}null_kv": torch.zeros(2, 52), f"{a}to_q.weight": torch.zeros(32 * 52, 4)}
    return state


@pytest.mark.parametrize("name, n_subjects, hidden, blurry, subjects", [
    ("final_multisubject_subj03", 7, 16, True, [1, 2, 4, 5, 6, 7, 8]),
    ("final_subj01_pretrained_40sess_24bs", 1, 16, True, [1]),
    ("final_subj05_pretrained_1sess_24bs", 1, 16, True, [5]),
    ("multisubject_subj01_1024hid_nolow_300ep", 7, 1024, False, [2, 3, 4, 5, 6, 7, 8]),
])
def test_the_config_follows_the_keys_and_the_released_name(tmp_path, name, n_subjects, hidden, blurry, subjects):
    path = tmp_path / name / "last.pth"
    save_released(path, nsd_like(n_subjects, hidden, blurry, prior=True))
    ckpt = load_checkpoint(path)
    cfg = ckpt.cfg
    assert (cfg.model.hidden, cfg.model.n_blocks, cfg.model.blurry, list(cfg.data.subjects)) == (hidden, 4, blurry,
                                                                                                 subjects)
    assert (cfg.prior.enabled, cfg.prior.depth, cfg.prior.heads, cfg.prior.dim_head) == (True, 6, 32, 52)
    assert cfg.train.batch_size == (24 if n_subjects == 1 else 42)  # the fine-tuning or the pretraining config
    voxel_counts = [ckpt.state[f"ridge.linears.{s}.weight"].shape[1] for s in range(n_subjects)]
    assert voxel_counts == list(range(10, 10 + n_subjects))


def test_a_file_without_prior_and_the_users_overrides(tmp_path):
    path = tmp_path / "renamed" / "last.pth"
    save_released(path, nsd_like(2, 8, blurry=False, prior=False))
    cfg = load_checkpoint(path, TINY_CONFIG, ["data.subjects=[2,4]"]).cfg
    assert (cfg.model.hidden, cfg.model.blurry, cfg.prior.enabled, list(cfg.data.subjects)) == (8, False, False, [2, 4])
    with pytest.raises(CheckpointError, match=r"holds the linear layers of 2 subjects \(voxel counts 10, 11\) but "
                                              r"data.subjects lists 3;"):
        load_checkpoint(path, TINY_CONFIG)  # its subjects 2, 3, 4
    with pytest.raises(CheckpointError, match="a MindEye 2 checkpoint, but .*mindeye_tiny.yaml is a 'mindeye' config"):
        load_checkpoint(path, ROOT / "train/configs/mindeye_tiny.yaml")


@pytest.mark.parametrize("payload, name", [(Evil("touch {marker}"), "posix.system"),
                                           (Fraction(1, 3), "fractions.Fraction")])
def test_any_other_pickled_global_is_refused_in_one_line_and_nothing_runs(released, reference, tmp_path, payload, name):
    marker = tmp_path / "ran"
    if isinstance(payload, Evil):
        payload.command = payload.command.format(marker=marker)
    path = tmp_path / "evil" / "last.pth"
    save_released(path, reference["state_dict"], notes=OrderedDict(extra=payload))
    assert name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    message = f"{path}: holds {name}, which is not a tensor, a known training object or a known config; refusing to unpickle it"
    for config_path in (None, TINY_CONFIG):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, config_path)
        assert str(e.value) == message
    assert not marker.exists()


def test_python_dash_m_eval_scores_a_released_file_with_a_tiny_config(released, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(released), "--config", str(TINY_CONFIG), "--out", str(out), "--device", "cpu", *TINY]
    assert eval_main([*argv, "data.subjects=[1,2]"]) == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    assert report["checkpoint"] == str(released) and report["n_subjects"] == 2
    assert "prior_forward_top1" in report and "blurry_r_across_samples/subj02" in report


def test_finetuning_starts_from_a_released_file(released, reference, cache, monkeypatch):
    """init.checkpoint=last.pth: the backbone and prior from the file, a fresh layer for the new subject."""
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    sizes = ["model.hidden=32", "model.n_blocks=2", "prior.depth=2", "prior.heads=2", "prior.dim_head=40"]
    cfg = config.load(TINY_CONFIG, [*TINY, *sizes, "data.subjects=[2]", f"init.checkpoint={released}"])
    model = registry.get("mindeye2")(cfg, 0, 1, torch.device("cpu"), train=False).model
    saved = from_mindeye2(reference["state_dict"])
    for name, value in model.state_dict().items():
        if name.startswith(("backbone.", "prior.")):
            assert torch.equal(value, saved[name]), name
    assert model.ridge.voxel_counts == [24]
    assert not torch.equal(model.ridge.linears[0].bias, saved["ridge.linears.1.bias"])


def test_other_weights_files_still_need_a_config(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model_state_dict": {"trunk.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="needs --config .*only MindEye 2's, MinD-Vis' and DC-MAE's checkpoints have a default"):
        load_checkpoint(path)
    path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"needs --config unless .* this one is unreadable \(\w+\)$"):
        load_checkpoint(path)
