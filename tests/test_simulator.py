import json

import numpy as np
import pytest

from data.shards import MANIFEST, load_manifest
from data.simulator.build import SimulatorConfig, build
from data.splits import load_split
from tests.conftest import SMALL_SIM


def test_manifest_describes_subjects_rois_splits_and_checksums(small_dataset):
    m = load_manifest(small_dataset)
    assert m["generator"]["version"] >= 1 and m["seed"] == SMALL_SIM["seed"]
    assert len(m["categories"]) == 20
    for s, n_vox in zip(("1", "2"), SMALL_SIM["voxels"]):
        subj = m["subjects"][s]
        assert subj["n_voxels"] == n_vox
        rois = subj["rois"]
        assert sorted(rois["early"] + rois["ventral"]) == list(range(n_vox))
        assert {k: v["n_samples"] for k, v in subj["splits"].items()} == {"train": 96, "val": 16, "test": 40}
        for split in subj["splits"].values():
            for rel in split["shards"]:
                assert len(m["shards"][rel]["sha256"]) == 64


def test_same_seed_same_bytes_other_seed_differs(small_dataset, tmp_path):
    again = build(SimulatorConfig(**SMALL_SIM, shard_max_bytes=40_000), tmp_path / "again")
    assert (again / MANIFEST).read_bytes() == (small_dataset / MANIFEST).read_bytes()
    other = build(SimulatorConfig(**{**SMALL_SIM, "seed": 4}, shard_max_bytes=40_000), tmp_path / "other")
    a, b = json.loads((small_dataset / MANIFEST).read_text()), json.loads((other / MANIFEST).read_text())
    assert a["shards"] != b["shards"]
    with pytest.raises(FileExistsError):
        build(SimulatorConfig(**SMALL_SIM), again)


def test_splits_shared_test_images_and_disjoint_training_images(small_dataset):
    m = load_manifest(small_dataset)
    s1 = {k: load_split(small_dataset, m, 1, k) for k in ("train", "val", "test")}
    s2 = {k: load_split(small_dataset, m, 2, k) for k in ("train", "val", "test")}
    assert s1["test"].image_ids.tolist() == s2["test"].image_ids.tolist()
    own1 = set(s1["train"].image_ids.tolist()) | set(s1["val"].image_ids.tolist())
    own2 = set(s2["train"].image_ids.tolist()) | set(s2["val"].image_ids.tolist())
    assert not own1 & own2 and not own1 & set(s1["test"].image_ids.tolist())
    assert set(s1["train"].image_ids.tolist()).isdisjoint(s1["val"].image_ids.tolist())
    assert s1["train"].voxels.shape == (96, 3, 300) and (s1["train"].n_repeats == 3).all()


def test_repeats_carry_signal_and_independent_noise(small_dataset):
    """Repeats of an image agree more than repeats of different images, but are not identical;
    per-voxel reliability spreads like NSD's: some voxels reliable, many weak or pure noise."""
    m = load_manifest(small_dataset)
    v = load_split(small_dataset, m, 1, "train").voxels.float().numpy()
    assert not np.allclose(v[:, 0], v[:, 1])
    same = np.mean([np.corrcoef(v[i, 0], v[i, 1])[0, 1] for i in range(len(v))])
    diff = np.mean([np.corrcoef(v[i, 0], v[i + 1, 1])[0, 1] for i in range(len(v) - 1)])
    assert same > diff + 0.05
    a, b = v[:, 0] - v[:, 0].mean(0), v[:, 1] - v[:, 1].mean(0)
    reliability = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    assert np.quantile(reliability, 0.9) > 0.3
    assert np.quantile(reliability, 0.3) < 0.15


def test_common_space_subjects_share_the_voxel_layout_and_most_tuning(tmp_path):
    """Voxel i responds alike in every common-space subject (shared test images, repeat
    averages); in native space the same index means unrelated voxels."""
    sim = dict(seed=5, n_subjects=2, voxels=[200], n_test=60, n_train=8, n_val=4, image_size=64)
    r = {}
    for common in (True, False):
        root = build(SimulatorConfig(**sim, common_space=common), tmp_path / f"common{common}")
        m = load_manifest(root)
        assert [m["subjects"][s]["n_voxels"] for s in ("1", "2")] == [200, 200] and m["common_space"] == common
        a, b = (load_split(root, m, s, "test").repeat_mean().numpy() for s in (1, 2))
        a, b = a - a.mean(0), b - b.mean(0)
        r[common] = np.median((a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0)))
    assert r[True] > 0.3 and abs(r[False]) < 0.15
