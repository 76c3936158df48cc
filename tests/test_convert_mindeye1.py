"""MindEye 1's published shards (tars of nsdgeneral.npy with -1-padded repeats, jpg,
coco73k.npy, trial.npy, num_uniques.npy, with metadata_subjSS.json's totals) re-packed into
ours: values, repeats, untouched JPEGs, captions from NSD's files; one-line errors naming the
tar (and member) for missing, extra, empty or truncated tars, totals that differ, broken
JPEGs, integer or string voxels and test images in training, all before anything is written;
`./`-prefixed member names and repeated training images read as MindEye 1 reads them; and a
recipe trained on the result."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.convert.__main__ import main as convert
from data.shards import load_manifest
from data.splits import iter_split
from launchers import convert as launcher
from tests.conftest import ROOT
from tests.test_convert_nsd import write_nsd
from train import main as train_main

V = 50
SPLITS = {"train": [2, 1] * 9, "val": [6], "test": [5, 5]}  # samples per tar, in MindEye 1's tar counts
N_TRAIN, N_VAL = sum(SPLITS["train"]), sum(SPLITS["val"])  # sample numbers: train, then val, then test


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _jpg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_mindeye1(root: Path, subject: int = 1, nan: bool = False, drop: str | None = None, wide: bool = False,
                   ids: dict[int, int] | None = None, edit=None, metadata: bool = True, name: str = "sample") -> dict:
    """MindEye 1's folder layout; returns {split: [(image id, trials [r, V], jpg bytes)]}. Sample n
    shows image `ids.get(n, 7 n)`; `edit(n, fields)` may change its files' bytes; members are
    named `{name}{n:09d}.{field}`; metadata_subjSS.json has the true totals (if `metadata`)."""
    rng = np.random.default_rng(0)
    truth, n, trial = {}, 0, 0
    for split, sizes in SPLITS.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        truth[split] = []
        for k, size in enumerate(sizes):
            with tarfile.open(root / split / f"{split}_subj{subject:02d}_{k}.tar", "w") as tar:
                for _ in range(size):
                    repeats = 3 if split == "test" else int(rng.integers(1, 4))
                    voxels = np.full((3, V + (wide and n == 5)), -1.0, np.float32)
                    voxels[:repeats] = rng.standard_normal((repeats, voxels.shape[1]))
                    if nan and n == 7:
                        voxels[0, 3] = np.nan
                    image_id = (ids or {}).get(n, n * 7)
                    jpg = _jpg(rng)
                    fields = {"nsdgeneral.npy": _npy(voxels), "jpg": jpg, "coco73k.npy": _npy(np.array([image_id])),
                              "trial.npy": _npy(np.array([trial])), "num_uniques.npy": _npy(np.array([repeats]))}
                    for ext, data in (edit(n, fields) if edit else fields).items():
                        if ext == drop and n == 4:
                            continue
                        info = tarfile.TarInfo(f"{name}{n:09d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    truth[split].append((image_id, voxels[:repeats], jpg))
                    n, trial = n + 1, trial + repeats
    if metadata:
        totals = {split: sum(sizes) for split, sizes in SPLITS.items()}
        (root / f"metadata_subj{subject:02d}.json").write_text(json.dumps({"totals": totals}))
    return truth


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["mindeye1", "--root", str(root), "--subject", "1", "--out", str(out), "--workers", "1", *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mindeye1")
    truth = write_mindeye1(root / "shards")
    write_nsd(root / "nsd")
    assert convert(_args(root / "shards", root / "out", "--nsd-root", str(root / "nsd"))) == 0
    return root / "out", truth


def test_mindeye1_shards_are_read_with_their_repeats_and_jpegs_untouched(converted):
    out, truth = converted
    manifest = load_manifest(out)
    entry = manifest["subjects"]["1"]
    assert entry["n_voxels"] == V
    assert {k: v["n_samples"] for k, v in entry["splits"].items()} == {k: sum(v) for k, v in SPLITS.items()}
    assert entry["metadata"] == "metadata_subj01.json" and entry["duplicate_images"] == {"train": 0, "val": 0, "test": 0}
    assert manifest["categories"] == ["person", "car", "train"]
    for split, expected in truth.items():
        samples = list(iter_split(out, manifest, 1, split, with_images=True))
        assert [s["image_id"] for s in samples] == [e[0] for e in expected]
        for s, (image_id, voxels, jpg) in zip(samples, expected):
            assert s["voxels"].shape == voxels.shape  # -1 rows dropped
            np.testing.assert_allclose(s["voxels"].astype(np.float32), voxels, atol=2e-3, rtol=1e-3)
            assert s["image"] == jpg
            assert s["captions"] == [f"image {image_id} caption 0", f"image {image_id} caption 1"]


def _replace(n_sample: int, field: str, data) -> callable:
    """An `edit` for write_mindeye1: sample n_sample's `field` becomes `data(old bytes)`."""
    return lambda n, fields: {**fields, field: data(fields[field])} if n == n_sample else fields


def _totals(train: int):
    return lambda root: (root / "metadata_subj01.json").write_text(json.dumps({"totals": {"train": train, "val": N_VAL,
                                                                                          "test": 10}}))


# train tars hold samples 0-1, 2, 3-4, 5, 6-7, 8, 9-10, ...; test_subj01_0.tar 33-37, test_subj01_1.tar 38-42
BAD = {  # case: (write_mindeye1 options, change to the written files, what the one error line names)
    "missing jpg": ({"drop": "jpg"}, None, ["train_subj01_2.tar: sample sample000000004 has no jpg"]),
    "voxel count": ({"wide": True}, None, ["train_subj01_3.tar: member sample000000005.nsdgeneral.npy has 51 voxels",
                                           "train_subj01_0.tar"]),
    "truncated tar": ({}, lambda r: (r / "train/train_subj01_0.tar").write_bytes(
        (r / "train/train_subj01_0.tar").read_bytes()[:3000]), ["train_subj01_0.tar", "truncated"]),
    "nan": ({"nan": True}, None, ["train_subj01_4.tar: member sample000000007.nsdgeneral.npy", "NaN"]),
    "missing tar": ({}, lambda r: (r / "train/train_subj01_17.tar").unlink(),
                    ["train_subj01_17.tar: missing", "train_subj01_{0..17}.tar"]),
    "tar outside the sequence": ({}, lambda r: shutil.copy(r / "test/test_subj01_1.tar", r / "test/test_subj01_2.tar"),
                                 ["test_subj01_2.tar: not one of", "test_subj01_{0..1}.tar"]),
    "zero-byte tar": ({}, lambda r: (r / "val/val_subj01_0.tar").write_bytes(b""), ["val_subj01_0.tar: empty file"]),
    "tar without samples": ({}, lambda r: tarfile.open(r / "test/test_subj01_1.tar", "w").close(),
                            ["test_subj01_1.tar: no samples"]),
    "totals differ": ({}, _totals(N_TRAIN + 1), ["metadata_subj01.json: totals give 28 train samples",
                                                 "train_subj01_{0..17}.tar hold 27"]),
    "no totals": ({}, lambda r: (r / "metadata_subj01.json").write_text("{}"), ["metadata_subj01.json", "'totals'"]),
    "truncated jpeg": ({"edit": _replace(9, "jpg", lambda b: b[: len(b) // 2])}, None,
                       ["train_subj01_6.tar: member sample000000009.jpg: unreadable image"]),
    "train image in test": ({"ids": {3: 40 * 7}}, None,
                            ["train_subj01_2.tar: sample sample000000003 shows image 280",
                             "test_subj01_1.tar: sample sample000000040", "leak"]),
    "image twice in test": ({"ids": {42: 33 * 7}}, None, ["test_subj01_1.tar: sample sample000000042 shows image 231",
                                                         "test_subj01_0.tar: sample sample000000033"]),
    "int16 voxels": ({"edit": _replace(2, "nsdgeneral.npy", lambda b: _npy(np.ones((3, V), np.int16)))}, None,
                     ["train_subj01_1.tar: member sample000000002.nsdgeneral.npy holds integer (int16) voxels",
                      "convert them to float"]),
    "string voxels": ({"edit": _replace(2, "nsdgeneral.npy", lambda b: _npy(np.full((3, V), "0.5")))}, None,
                      ["train_subj01_1.tar: member sample000000002.nsdgeneral.npy holds <U3 values"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_mindeye1_shards_get_one_line_errors_naming_the_tar(case, tmp_path, capsys):
    root, out = tmp_path / "shards", tmp_path / "out"
    options, change, names = BAD[case]
    write_mindeye1(root, **options)
    if change:
        change(root)
    assert convert(_args(root, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and all(n in err for n in names), err
    assert not out.exists()  # checked before anything is written


def test_webdataset_member_names_and_repeated_training_images_are_read_as_mindeye1_reads_them(tmp_path, capsys):
    """`./sample…` members; samples 0 and 1 (adjacent), and 5, show image 0; val sample 27
    shows train sample 2's image; no metadata file: converted, with notes and counts."""
    root, out = tmp_path / "shards", tmp_path / "out"
    truth = write_mindeye1(root, ids={1: 0, 5: 0, N_TRAIN: 14}, metadata=False, name="./sample")
    assert convert(_args(root, out)) == 0
    stdout = capsys.readouterr().out
    assert "2 train and 0 val samples show an image" in stdout and "1 val images are in train" in stdout
    assert "metadata_subj01.json not found" in stdout
    manifest = load_manifest(out)
    entry = manifest["subjects"]["1"]
    assert entry["duplicate_images"] == {"train": 2, "val": 0, "test": 0} and entry["val_images_in_train"] == 1
    assert entry["metadata"] is None
    for split, expected in truth.items():
        samples = list(iter_split(out, manifest, 1, split))
        assert [s["image_id"] for s in samples] == [e[0] for e in expected]
        for s, (_, voxels, _) in zip(samples, expected):
            np.testing.assert_allclose(s["voxels"].astype(np.float32), voxels, atol=2e-3, rtol=1e-3)
    keys = [s["key"] for s in iter_split(out, manifest, 1, "train")]
    assert keys[:2] == ["s01_000000", "s01_000000_1"] and keys[5] == "s01_000000_2" and len(set(keys)) == N_TRAIN


def test_a_recipe_trains_on_converted_mindeye1_shards(converted, tmp_path, cache, monkeypatch):
    out, _ = converted
    run = tmp_path / "ridge"
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    assert train_main.main(["--config", str(ROOT / "train/configs/ridge_clip_tiny.yaml"), f"data.root={out}",
                            f"run_dir={run}", "ridge.alphas=[1,100]", "ridge.folds=2", "clip.tiny.image_size=32"]) == 0
    assert json.loads((run / "test_results.json").read_text())


def test_a_job_array_converts_several_subjects_into_one_folder(tmp_path):
    for subject in (1, 2):
        write_mindeye1(tmp_path / "shards", subject)
    out = tmp_path / "out"
    code = launcher.main(["mindeye1", "--subjects", "1", "2", "--cluster", "local", "--cpus-per-task", "1", "--wait", "--",
                          "--root", str(tmp_path / "shards"), "--out", str(out)])
    assert code == 0
    manifest = load_manifest(out)
    assert sorted(manifest["subjects"]) == ["1", "2"]
    assert all(rel in manifest["shards"] for s in ("1", "2") for split in manifest["subjects"][s]["splits"].values()
               for rel in split["shards"])
    assert launcher.main(["mindeye1", "--subjects", "1", "--cluster", "local", "--", "--root", str(tmp_path),
                          "--out", str(out), "--no-such-flag"]) == 2  # refused before submission
