"""Bad training input ends in one `error:` line naming the key or path, exit status 2, and
nothing lost: numeric keys out of range, a batch larger than the split, --resume with a
model of another shape, and a full disk at a checkpoint."""
from __future__ import annotations

import errno
import shutil

import pytest
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from tests.conftest import SMALL_RUN
from train import config, main

TINY = main.ROOT / "train/configs/mindeye_tiny.yaml"


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


@pytest.mark.parametrize("override, named", [
    ("train.epochs=0", "train.epochs=0"), ("train.epochs=-1", "train.epochs=-1"),
    ("train.batch_size=0", "train.batch_size=0"), ("train.batch_size=-8", "train.batch_size=-8"),
    ("train.lr=0", "train.lr=0.0"), ("model.input_dropout=1.5", "model.input_dropout=1.5"),
    ("eval.n_way=1", "eval.n_way=1"), ("train.lr=nan", "train.lr=nan"), ("model.hidden=-3", "model.hidden=-3"),
])
def test_numeric_keys_out_of_range_are_one_line_naming_the_key(override, named, tmp_path, capsys):
    run = tmp_path / "run"
    assert main.main([f"run_dir={run}", override]) == 2
    line = one_error(capsys)
    assert named in line and "expected" in line
    assert not run.exists()  # checked before anything is written


def test_every_shipped_config_is_within_the_ranges():
    for path in sorted((main.ROOT / "train/configs").glob("*.yaml")):
        config.load(path, [])  # raises ConfigError naming the key otherwise


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of the tiny MindEye on the small simulated dataset."""
    base = tmp_path_factory.mktemp("errors")
    run, cache = base / "run", base / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMRIDECODE_CACHE", str(cache))
        assert main.main([f"run_dir={run}", *SMALL_RUN, "train.max_steps=2", "ds.bf16.enabled=false"]) == 0
    return run, cache


def test_a_batch_larger_than_the_split_is_one_line(trained, tmp_path, capsys, monkeypatch):
    _, cache = trained
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    assert main.main([f"run_dir={tmp_path / 'big'}", *SMALL_RUN, "train.batch_size=4096", "ds.bf16.enabled=false"]) == 2
    line = one_error(capsys)
    assert "train.batch_size=4096" in line and "training samples" in line
    assert not (tmp_path / "big" / "checkpoints").exists()


def test_resume_with_another_model_shape_names_the_keys(trained, capsys, monkeypatch):
    run, cache = trained
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    latest = (run / "checkpoints" / "latest").read_text()
    assert main.main(["--resume", f"run_dir={run}", "model.hidden=32", "train.max_steps=4"]) == 2
    line = one_error(capsys)
    assert line.startswith("error: --resume:") and "backbone" in line and "[32," in line and "[64," in line
    assert (run / "checkpoints" / "latest").read_text() == latest


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")])
def test_a_full_disk_at_a_checkpoint_is_one_line_naming_it_and_keeps_the_last(trained, tmp_path, capsys,
                                                                              monkeypatch, failure):
    run, cache = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))

    def full(*args, **kwargs):
        raise failure
    monkeypatch.setattr(TorchCheckpointEngine, "save", full)
    assert main.main(["--resume", f"run_dir={copy}", "train.max_steps=4"]) == 2
    line = one_error(capsys)
    assert str(copy / "checkpoints" / "step00000004") in line
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step00000002"  # the last good one stays
