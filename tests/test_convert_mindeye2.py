"""MindEye 2's release (HDF5 betas and images, webdataset tars of behav.npy rows) converted on small
files in its formats: voxels, pixels, sessions and splits read back, `--sessions 1`, `--test test`,
byte-identical resume after a kill, and one-line errors for bad inputs before anything is written."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import webdataset as wds

from data.convert.__main__ import main as convert
from data.convert.common import carve_val
from data.shards import MANIFEST, ShardWriter, decode_image, load_manifest, sha256
from data.splits import iter_split, load_split

V, SIZE, N_IMAGES, SESSIONS = 8, 16, 20, 3  # images are 224 x 224 in the release; the converter takes any size
TRAIN = [[0, 1, 2, 3, 4, 5], [1, 2, 6, 7, 8, 0], [2, 9, 10, 11, 6, 3]]  # the image of each trial of each session
NEW_TEST = {15: [0, 1, 2], 16: [2, 0, 1], 17: [1, 2]}  # test image -> sessions (0-based) of its trials, as written
OLD_TEST = {15: [0, 1, 2], 16: [0, 1], 17: [1]}


def _trial(session: int, image: int, test: bool) -> int:
    """A trial's row of the betas: NSD's 750 per session, training and test trials apart."""
    return 750 * session + (500 + image if test else 10 * TRAIN[session].index(image) + 3)


def _behav(image: int, trial: int) -> dict:
    """A sample's members; behav.npy's columns 0-2 and 5 are image, subject, session and trial, the rest -1."""
    row = np.full((1, 17), -1.0)
    row[0, :3], row[0, 5] = (image, 1, trial // 750 + 1), trial
    return {"behav.npy": row, "past_behav.npy": np.full((15, 17), -1.0), "future_behav.npy": np.full((15, 17), -1.0),
            "olds_behav.npy": np.full((3, 17), -1.0)}


def _tar(path: Path, rows: list[tuple[int, int]], first: int, bad: tuple[int, float] | None = None) -> int:
    """A tar of (image, trial) rows as samples first, first + 1, ...; `bad` (column, value) changes the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for n, (image, trial) in enumerate(rows, first):
            fields = _behav(image, trial)
            if bad and n == first:
                fields["behav.npy"][0, bad[0]] = bad[1]
            sink.write({"__key__": f"sample{n:09d}", **fields})
    return first + len(rows)


def write_release(root: Path, images_shape: tuple[int, ...] = (N_IMAGES, 3, SIZE, SIZE),
                  bad: tuple[int, float] | None = None) -> dict:
    """The release's files for subject 1; returns the betas and images written. `bad` (column,
    value) changes the behav.npy row of train/0.tar's first sample."""
    rng = np.random.default_rng(0)
    betas = rng.standard_normal((750 * SESSIONS, V)).astype(np.float32)
    betas[749] = np.nan  # a trial no sample refers to
    images = rng.random(images_shape).astype(np.float16)
    with h5py.File(root / "betas_all_subj01_fp32_renorm.hdf5", "w") as f:
        f["betas"] = betas
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as f:
        f["images"] = images
    wds_dir, n = root / "wds/subj01", 0
    for k, shown in enumerate(TRAIN):
        n = _tar(wds_dir / f"train/{k}.tar", [(i, _trial(k, i, False)) for i in shown], n, bad if k == 0 else None)
    for name, tests in (("new_test", NEW_TEST), ("test", OLD_TEST)):  # in image order, not trial order
        _tar(wds_dir / f"{name}/0.tar", [(i, _trial(k, i, True)) for i, ks in tests.items() for k in ks], 0)
    return {"betas": betas, "images": images}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("mindeyev2")
    return root, write_release(root)


@pytest.fixture(scope="module")
def converted(release):
    root, truth = release
    out = root.parent / "me2_out"
    assert convert(_args(root, out, "--sessions", "3")) == 0
    return out, truth


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["mindeye2", "--root", str(root), "--subject", "1", "--out", str(out), "--val", "2", "--workers", "1",
            "--shard-mb", "0.005", *extra]  # a few samples per shard


def _expected(n_sessions: int, tests: dict[int, list[int]]) -> dict[int, tuple[list[int], list[int]]]:
    """Image -> (its trials in trial order, their 1-based sessions), from the files' description."""
    trials: dict[int, list[int]] = {}
    for k in range(n_sessions):
        for i in TRAIN[k]:
            trials.setdefault(i, []).append(_trial(k, i, False))
    for i, ks in tests.items():
        trials[i] = [_trial(k, i, True) for k in ks]
    return {i: (sorted(ts), [t // 750 + 1 for t in sorted(ts)]) for i, ts in trials.items()}


def _check(out: Path, truth: dict, n_sessions: int, tests: dict[int, list[int]], test_ids: list[int]) -> None:
    manifest = load_manifest(out)
    expected = _expected(n_sessions, tests)
    train_ids = sorted({i for k in range(n_sessions) for i in TRAIN[k]})
    val = sorted(carve_val(train_ids, 2))
    ids = {"train": sorted(set(train_ids) - set(val)), "val": val, "test": test_ids}
    for split, split_ids in ids.items():
        arrays = load_split(out, manifest, 1, split)
        assert arrays.image_ids.tolist() == split_ids
        for n, i in enumerate(split_ids):
            rows, sessions = expected[i]
            assert int(arrays.n_repeats[n]) == len(rows)
            assert (arrays.voxels[n, : len(rows)].numpy() == truth["betas"][rows].astype(np.float16)).all()
            assert arrays.sessions[n, : len(rows)].tolist() == sessions
        assert arrays.labels.shape == (len(split_ids), 0)
        for sample in iter_split(out, manifest, 1, split, with_images=True):
            pixels = np.round(truth["images"][sample["image_id"]].astype(np.float32) * 255).astype(np.uint8)
            assert (decode_image(sample["image"]) == pixels.transpose(1, 2, 0)).all() and sample["captions"] == []


def test_the_release_converts_to_one_sample_per_image_with_every_trial(converted):
    out, truth = converted
    entry = load_manifest(out)["subjects"]["1"]
    assert entry["n_voxels"] == V and entry["sessions"] == 3 and entry["trials"] == 18 + 8
    assert {k: v["n_samples"] for k, v in entry["splits"].items()} == {"train": 10, "val": 2, "test": 2}
    assert entry["shared_images_with_fewer_than_3_trials"] == 1 and len(entry["splits"]["train"]["shards"]) > 1
    _check(out, truth, 3, NEW_TEST, [15, 16])
    assert not (out / ".convert/subj01").exists()  # scratch removed when complete


def test_sessions_1_keeps_the_first_tar_and_the_whole_test_tar(release, tmp_path):
    root, truth = release
    assert convert(_args(root, tmp_path / "out", "--sessions", "1")) == 0
    assert load_manifest(tmp_path / "out")["subjects"]["1"]["sessions"] == 1
    _check(tmp_path / "out", truth, 1, NEW_TEST, [15, 16])


def test_the_older_test_set_on_request(release, tmp_path):
    root, truth = release
    assert convert(_args(root, tmp_path / "out", "--sessions", "3", "--test", "test")) == 0
    assert load_manifest(tmp_path / "out")["subjects"]["1"]["shared_images_with_fewer_than_3_trials"] == 2
    _check(tmp_path / "out", truth, 3, OLD_TEST, [15])


def test_every_session_of_the_subject_unless_told_otherwise(release, tmp_path, capsys):
    root, out = release[0], tmp_path / "out"
    assert convert(_args(root, out)) == 2  # subject 1 has 40 sessions; the files hold 3
    assert capsys.readouterr().err.endswith("wds/subj01/train/3.tar: tar of MindEye 2's release missing\n")
    assert convert(_args(root, out, "--sessions", "41")) == 2
    assert capsys.readouterr().err == "error: --sessions 41: subject 1 has sessions 1 to 40\n"
    assert not out.exists()


def test_an_interrupted_conversion_resumes_to_byte_identical_shards(release, converted, tmp_path, monkeypatch):
    root, out = release[0], tmp_path / "out"
    real = ShardWriter.write_encoded
    written = []

    def write_then_die(self, key, fields):
        if len(written) == 5:
            raise KeyboardInterrupt  # killed in the middle of the train split
        written.append(key)
        real(self, key, fields)

    monkeypatch.setattr(ShardWriter, "write_encoded", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert(_args(root, out, "--sessions", "3"))
    assert not (out / MANIFEST).exists() and len(list((out / "subj01").glob("train-*.tar"))) > 1
    monkeypatch.setattr(ShardWriter, "write_encoded", real)
    assert convert(_args(root, out, "--sessions", "3")) == 0
    ours, theirs = load_manifest(out)["shards"], load_manifest(converted[0])["shards"]
    assert ours == theirs and all(sha256(out / rel) == record["sha256"] for rel, record in ours.items())


BAD = {  # case -> (write_release options, what else to break, (texts the error holds))
    "missing betas": ({}, lambda root: (root / "betas_all_subj01_fp32_renorm.hdf5").unlink(),
                      ("betas_all_subj01_fp32_renorm.hdf5: input file missing",)),
    "missing tar": ({}, lambda root: (root / "wds/subj01/train/1.tar").unlink(),
                    ("wds/subj01/train/1.tar: tar of MindEye 2's release missing",)),
    "channel-last images": ({"images_shape": (N_IMAGES, SIZE, SIZE, 3)}, None,
                            ("coco_images_224_float16.hdf5: dataset 'images' has shape (20, 16, 16, 3)",
                             "expected (*, 3, *, *)")),
    "trial out of range": ({"bad": (5, 750 * SESSIONS)}, None,
                           ("wds/subj01/train/0.tar: member sample000000000.behav.npy: trial 2250 (column 5)",
                            "betas_all_subj01_fp32_renorm.hdf5 (0 to 2249)")),
    "image out of range": ({"bad": (0, N_IMAGES)}, None,
                           ("train/0.tar: member sample000000000.behav.npy: image 20 (column 0)",
                            "coco_images_224_float16.hdf5 (0 to 19)")),
    "test image in training": ({"bad": (0, 16)}, None,
                               ("new_test/0.tar: member sample000000004.behav.npy: test image 16 is in training too",
                                "train/0.tar: member sample000000000.behav.npy")),
    "trial in two samples": ({"bad": (5, _trial(0, 1, False))}, None,
                             ("train/0.tar: member sample000000001.behav.npy: trial 13 is in another sample too",
                              "train/0.tar: member sample000000000.behav.npy")),
    "NaN betas": ({}, lambda root: _nan(root / "betas_all_subj01_fp32_renorm.hdf5", _trial(1, 7, False)),
                  (f"betas_all_subj01_fp32_renorm.hdf5: NaN or Inf betas in trial {_trial(1, 7, False)}",)),
    "wrong dataset": ({}, lambda root: _rename(root / "coco_images_224_float16.hdf5", "images", "imgBrick"),
                      ("coco_images_224_float16.hdf5: no dataset 'images' (has ['imgBrick'])",)),
}


def _nan(path: Path, row: int) -> None:
    with h5py.File(path, "r+") as f:
        f["betas"][row, 3] = np.nan


def _rename(path: Path, old: str, new: str) -> None:
    with h5py.File(path, "r+") as f:
        f.move(old, new)


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_get_one_line_errors_naming_the_file_before_anything_is_written(case, tmp_path, capsys):
    options, damage, texts = BAD[case]
    root, out = tmp_path / "release", tmp_path / "out"
    root.mkdir()
    write_release(root, **options)
    if damage:
        damage(root)
    assert convert(_args(root, out, "--sessions", "3")) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in stderr
    assert all(text in errors[0] for text in texts), errors[0]
    assert not out.exists()
