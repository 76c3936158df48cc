"""Bad input gets a one-line error naming the file, and nothing is overwritten."""
import errno
import json
from pathlib import Path

import numpy as np
import pytest

from data.cli import describe_os_error
from data.files import atomic_write_text
from data.shards import MANIFEST, DataError, Sample, ShardWriter, load_manifest
from data.splits import load_split


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_shard(dataset_copy):
    m = load_manifest(dataset_copy)
    shard = dataset_copy / m["subjects"]["1"]["splits"]["train"]["shards"][0]
    shard.unlink()
    with pytest.raises(DataError) as e:
        load_split(dataset_copy, m, 1, "train")
    assert str(shard) in _one_line(e) and "missing" in str(e.value)


def test_corrupt_shard(dataset_copy):
    m = load_manifest(dataset_copy)
    shard = dataset_copy / m["subjects"]["1"]["splits"]["test"]["shards"][0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        load_split(dataset_copy, m, 1, "test")
    assert str(shard) in _one_line(e) and "corrupt" in str(e.value)


def test_voxel_count_disagreeing_with_manifest(dataset_copy):
    m = json.loads((dataset_copy / MANIFEST).read_text())
    m["subjects"]["1"]["n_voxels"] = 299
    (dataset_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        load_split(dataset_copy, load_manifest(dataset_copy), 1, "val")
    assert "299" in _one_line(e) and "subj01/val" in str(e.value)


def _load_error(root, samples: list[Sample]) -> pytest.ExceptionInfo:
    """The DataError of reading a train split of subject 1 (10 voxels) made of `samples`."""
    writer = ShardWriter(root, "subj01/train")
    for sample in samples:
        writer.write(sample)
    shards = writer.close()
    manifest = {"format": "fmri-shards/1", "shards": shards, "subjects": {"1": {"n_voxels": 10, "splits": {
        "train": {"n_samples": len(samples), "shards": list(shards)}}}}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        load_split(root, load_manifest(root), 1, "train")
    return e


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, bad):
    voxels = np.zeros((3, 10), np.float32)
    voxels[1, 4] = bad
    e = _load_error(tmp_path, [Sample(1, 7, voxels, np.zeros((8, 8, 3), np.uint8), np.zeros(20, np.float32), ["x"])])
    assert "subj01/train-000000.tar" in _one_line(e) and "s01_000007" in str(e.value) and "NaN or Inf" in str(e.value)


@pytest.mark.parametrize("case", ["length", "mixed"])
def test_trial_sessions_that_disagree_with_the_trials(tmp_path, case):
    e = _load_error(tmp_path, [Sample(1, image_id, np.zeros((3, 10), np.float32), None, np.zeros(20, np.float32), ["x"],
                                      None if sessions is None else np.array(sessions))
                               for image_id, sessions in ((7, [1, 2] if case == "length" else [1, 1, 2]), (8, None))])
    expected = "s01_000007 has sessions of shape (2,)" if case == "length" else "1 of 2 samples record no trial sessions"
    assert expected in _one_line(e)


def test_missing_or_foreign_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_a_full_disk_during_an_atomic_write_names_the_file_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / MANIFEST
    path.write_text("old")
    real = Path.write_bytes

    def half_then_full(self, data):  # as a real write: part of the data, then an error naming no file
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError) as e:
        atomic_write_text(path, "new contents")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert describe_os_error(e.value) == f"{path}: no space left on the device"
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [MANIFEST]
