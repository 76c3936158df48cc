"""The NSD converter on small files written in NSD's own formats (NIfTI masks and betas,
HDF5 betas and stimuli, the experiment design .mat, the stimulus-info CSV, COCO JSON):
values read back, splits, captions and categories, one-line errors for bad inputs,
byte-identical resume after a kill, and a recipe trained on the result."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
import torch

from data.convert import nsd
from data.convert.__main__ import main as convert
from data.shards import MANIFEST, ShardWriter, decode_image, load_manifest, sha256
from data.splits import iter_split, load_split
from data.subject_data import SubjectData
from tests.conftest import ROOT
from tests.test_convert_datasets import write_god
from train import config
from train import main as train_main

GRID = (6, 7, 5)
N_IMAGES, SIZE = 600, 16
SHARED = 12  # shared images: 10 seen 3 times, 2 seen twice (left out of the test split)
OWN = 490  # own images: 488 seen 3 times, 2 once
CATEGORIES = {1: "person", 3: "car", 7: "train"}  # COCO ids are not contiguous


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def write_nsd(root: Path, subject: int = 1, sessions=("hdf5", "nii"), masked_voxels: int | None = None,
              nan: bool = False, image_range: int = N_IMAGES) -> dict:
    """Write an NSD-layout download with `len(sessions)` sessions of 750 trials; returns what
    the test needs to predict the converter's output."""
    rng = np.random.default_rng(subject)
    general = np.full(GRID, -1, np.int16)
    general[1:5, 1:6, 1:4] = 0
    general[1:5, 1:6, 2:4] = 1  # 40 nsdgeneral voxels inside a 60-voxel brain
    mask = general > 0
    streams = np.zeros(GRID, np.int16)
    streams[1:3, 1:6, 2:4] = 1  # early
    streams[3:5, 1:6, 3] = 5  # ventral
    roi = root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi"
    _nifti(roi / "nsdgeneral.nii.gz", general)
    _nifti(roi / "streams.nii.gz", streams)

    # Design: subjectim columns 0..11 are the shared images, then the subject's own.
    ids = rng.permutation(N_IMAGES)[: SHARED + OWN]
    subjectim = np.ones((8, 10000), np.int64)
    subjectim[subject - 1, : len(ids)] = ids + 1
    shown = [*np.repeat(np.arange(10), 3), 10, 10, 11, 11,
             *np.repeat(np.arange(SHARED, SHARED + OWN - 2), 3), SHARED + OWN - 2, SHARED + OWN - 1]
    assert len(shown) == 1500
    order = np.ones(30000, np.int64)
    order[:1500] = rng.permutation(shown) + 1
    if image_range != N_IMAGES:
        subjectim[subject - 1, order[0] - 1] = image_range
    design = root / "nsddata/experiments/nsd"
    design.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(design / "nsd_expdesign.mat", {"masterordering": order[None], "subjectim": subjectim,
                                                     "sharedix": ids[None, :SHARED] + 1})
    with open(design / "nsd_stim_info_merged.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "cocoId", "cocoSplit", "nsdId"])
        for i in range(N_IMAGES):
            w.writerow([i, 1000 + i, "train2017" if i % 4 else "val2017", i])
    annotations = root / "nsddata_stimuli/stimuli/nsd/annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    for split, members in (("train2017", [i for i in range(N_IMAGES) if i % 4]), ("val2017", range(0, N_IMAGES, 4))):
        caps = [{"image_id": 1000 + i, "id": k, "caption": f"image {i} caption {k} "} for i in members for k in range(2)]
        inst = [{"image_id": 1000 + i, "category_id": c} for i in members for c in CATEGORIES if (i + c) % 3 == 0]
        (annotations / f"captions_{split}.json").write_text(json.dumps({"annotations": caps}))
        cats = [{"id": c, "name": n} for c, n in reversed(CATEGORIES.items())]
        (annotations / f"instances_{split}.json").write_text(json.dumps({"categories": cats, "annotations": inst}))
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    stimuli = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    stimuli.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(stimuli, "w") as f:
        f["imgBrick"] = images

    image_of_trial = ids[order[:1500] - 1]
    signal = rng.standard_normal((N_IMAGES, int(mask.sum())))
    raw = []
    betas_dir = root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    betas_dir.mkdir(parents=True, exist_ok=True)
    for k, kind in enumerate(sessions):
        shown_ids = image_of_trial[k * 750 : (k + 1) * 750]
        volume = rng.normal(0, 0.5, (750, *GRID)) + 2.0 * (k + 1)  # session offsets differ
        volume[:, mask] += signal[shown_ids]
        volume = np.round(volume * 300).astype(np.int16)
        raw.append(volume[:, mask].astype(np.float32) / 300)
        name = betas_dir / f"betas_session{k + 1:02d}"
        if kind == "nii":
            _nifti(name.with_suffix(".nii.gz"), np.moveaxis(volume, 0, -1))
            continue
        with h5py.File(name.with_suffix(".hdf5"), "w") as f:
            if masked_voxels is not None:  # MindEye 2-style, already masked (float)
                flat = rng.standard_normal((750, masked_voxels)).astype(np.float32)
                if nan:
                    flat[3, 2] = np.nan
                f["betas"] = flat
            else:
                f["betas"] = volume.transpose(0, 3, 2, 1)  # (trials, z, y, x), as NSD's HDF5
    return {"mask": mask, "streams": streams, "images": images, "ids": ids, "trials": image_of_trial, "raw": raw}


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["nsd", "--root", str(root), "--subject", "1", "--out", str(out), "--sessions", "2", "--val", "20",
            "--workers", "1", *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd")
    truth = write_nsd(root)
    out = root.parent / "nsd_out"
    assert convert(_args(root, out, "--shard-mb", "0.05")) == 0
    return root, out, truth


def test_nsd_conversion_keeps_every_trial_z_scored_without_the_shared_trials(converted):
    root, out, truth = converted
    manifest = load_manifest(out)
    entry = manifest["subjects"]["1"]
    assert entry["n_voxels"] == int(truth["mask"].sum()) == 40
    assert {k: v["n_samples"] for k, v in entry["splits"].items()} == {"train": OWN - 20, "val": 20, "test": 10}
    assert entry["shared_images_with_fewer_than_3_trials"] == 2 and entry["sessions"] == 2
    assert len(entry["splits"]["train"]["shards"]) > 1  # 0.05 MB shards
    streams = truth["streams"][truth["mask"]]
    assert entry["rois"]["early"] == np.flatnonzero(streams == 1).tolist()
    assert entry["rois"]["ventral"] == np.flatnonzero(streams == 5).tolist()
    assert manifest["categories"] == ["person", "car", "train"]

    # Expected voxels: each session z-scored with its trials of non-shared images only.
    shared = set(truth["ids"][:SHARED].tolist())
    z = []
    for k, raw in enumerate(truth["raw"]):
        keep = np.array([i not in shared for i in truth["trials"][k * 750 : (k + 1) * 750]])
        z.append((raw - raw[keep].mean(0)) / raw[keep].std(0))
    z = np.concatenate(z)
    for split in ("train", "val", "test"):
        arrays = load_split(out, manifest, 1, split)
        for n, image_id in enumerate(arrays.image_ids.tolist()):
            rows = np.flatnonzero(truth["trials"] == image_id)
            assert int(arrays.n_repeats[n]) == len(rows)
            assert arrays.sessions[n].tolist() == [*(rows // 750 + 1), *[0] * (arrays.sessions.shape[1] - len(rows))]
            np.testing.assert_allclose(arrays.voxels[n, : len(rows)].float().numpy(), z[rows], atol=2e-3, rtol=2e-3)
        assert set(arrays.sessions[arrays.sessions > 0].tolist()) == {1, 2}
    test = load_split(out, manifest, 1, "test")
    assert set(test.image_ids.tolist()) == set(truth["ids"][:10].tolist()) and (test.n_repeats == 3).all()
    sample = next(iter_split(out, manifest, 1, "val", with_images=True))
    i = sample["image_id"]
    assert (decode_image(sample["image"]) == truth["images"][i]).all()
    assert sample["captions"] == [f"image {i} caption 0", f"image {i} caption 1"]
    assert sample["labels"].tolist() == [float((i + c) % 3 == 0) for c in CATEGORIES]
    assert not (out / ".convert").joinpath("subj01").exists()  # scratch removed when complete


def test_the_training_trials_of_the_first_session(converted, tmp_path, monkeypatch):
    """`loader(sessions=1)`: each training image keeps its trials of session 1 (trials 0-749), or is dropped."""
    _, out, truth = converted
    monkeypatch.setenv("FMRIDECODE_CACHE", str(tmp_path))
    data = SubjectData(config.load(ROOT / "train/configs/mindeye2_finetune_tiny.yaml", [f"data.root={out}"]), [1])
    full = load_split(out, load_manifest(out), 1, "train")
    first = data.loader(0, 1, sessions=1).split
    kept = {}  # training image -> positions among its trials of those in session 1
    for image_id in full.image_ids.tolist():
        in_first = np.flatnonzero(np.flatnonzero(truth["trials"] == image_id) < 750)
        if len(in_first):
            kept[image_id] = in_first
    assert 0 < len(kept) < len(full) and any(len(k) < int(r) for k, r in zip(kept.values(), full.n_repeats))
    assert first.image_ids.tolist() == list(kept)
    assert first.n_repeats.tolist() == [len(k) for k in kept.values()]
    assert int(first.n_repeats.sum()) == sum(int(i) in kept for i in truth["trials"][:750])
    index = {i: n for n, i in enumerate(full.image_ids.tolist())}
    for n, (image_id, positions) in enumerate(kept.items()):
        assert torch.equal(first.voxels[n, : len(positions)], full.voxels[index[image_id], positions])
        assert not first.voxels[n, len(positions) :].any() and (first.sessions[n, : len(positions)] == 1).all()
    assert torch.equal(data.loader(0, 1, sessions=3).split.voxels, full.voxels)  # more sessions than converted: all


def test_a_second_conversion_of_the_same_subject_changes_nothing(converted, capsys):
    _, out, _ = converted
    before = (out / MANIFEST).read_bytes()
    assert convert(_args(Path("/nonexistent"), out)) == 0
    assert "already converted" in capsys.readouterr().out and (out / MANIFEST).read_bytes() == before


def test_an_interrupted_conversion_resumes_to_byte_identical_shards(converted, tmp_path, monkeypatch):
    root, reference, _ = converted
    out = tmp_path / "out"
    reads = []
    real_read = nsd._Session.read

    def read_then_die(self):
        if len(reads) == 1:
            raise KeyboardInterrupt  # killed while z-scoring session 2
        reads.append(self.path)
        return real_read(self)

    monkeypatch.setattr(nsd._Session, "read", read_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert(_args(root, out, "--shard-mb", "0.05"))
    monkeypatch.setattr(nsd._Session, "read", lambda self: reads.append(self.path) or real_read(self))
    written = []
    real_encoded = ShardWriter.write_encoded

    def write_then_die(self, key, fields):
        if len(written) == 155:
            raise KeyboardInterrupt  # killed in the middle of the train split (and of a shard)
        written.append(key)
        real_encoded(self, key, fields)

    monkeypatch.setattr(ShardWriter, "write_encoded", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert(_args(root, out, "--shard-mb", "0.05"))
    assert len(reads) == 2 and not (out / MANIFEST).exists()  # session 1 was not read again
    kept = {p.name for p in (out / "subj01").glob("*.tar")}
    assert kept and any(p.name.startswith(".") for p in (out / "subj01").iterdir())  # an unfinished temp shard

    monkeypatch.setattr(ShardWriter, "write_encoded", real_encoded)
    assert convert(_args(root, out, "--shard-mb", "0.05", "--workers", "2")) == 0
    assert len(reads) == 2  # the z-scored sessions were kept
    ours, theirs = load_manifest(out)["shards"], load_manifest(reference)["shards"]
    assert ours == theirs
    assert all(sha256(out / rel) == rec["sha256"] for rel, rec in ours.items())
    assert sorted(p.name for p in (out / "subj01").iterdir()) == sorted(Path(r).name for r in ours)


def test_resuming_with_other_arguments_is_refused(converted, tmp_path, monkeypatch, capsys):
    root, _, _ = converted
    out = tmp_path / "out"
    monkeypatch.setattr(nsd._Session, "read", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert(_args(root, out))
    assert convert(_args(root, out, "--val", "30")) == 2
    err = capsys.readouterr().err
    assert "other arguments" in err and "state.json" in err


def test_god_subjects_are_refused_by_a_folder_of_nsd_before_anything_is_written(converted, tmp_path, capsys):
    """Subject 1 was "already converted; nothing to do"; subject 2 failed only at the manifest,
    after writing its shards and leaving scratch that blocked later conversions."""
    _, out, _ = converted
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    write_god(tmp_path / "god", 1)
    write_god(tmp_path / "god", 2)
    for subject in (1, 2):
        capsys.readouterr()
        assert convert(["god", "--root", str(tmp_path / "god"), "--subject", str(subject), "--out", str(out),
                        "--val", "3"]) == 2
        captured = capsys.readouterr()
        assert not captured.out and captured.err == (
            f"error: {out}: holds dataset 'nsd' (converter data.convert.nsd version 2), not god (data.convert.god "
            f"version 1); convert god subject {subject} into another folder\n")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


@pytest.mark.parametrize("case", ["not_nsdgeneral", "voxel_count", "missing_session", "truncated", "nan", "image_range",
                                  "binarised_mask", "string_betas"])
def test_bad_nsd_inputs_get_one_line_errors_naming_the_file(case, tmp_path, capsys):
    root, out = tmp_path / "nsd", tmp_path / "out"
    options = {"not_nsdgeneral": {"masked_voxels": 60}, "voxel_count": {"masked_voxels": 41},
               "nan": {"masked_voxels": 40, "nan": True}, "image_range": {"image_range": N_IMAGES + 1}}
    write_nsd(root, **options.get(case, {}))
    betas = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    if case == "missing_session":
        (betas / "betas_session02.nii.gz").unlink()
    if case == "truncated":
        data = (betas / "betas_session01.hdf5").read_bytes()
        (betas / "betas_session01.hdf5").write_bytes(data[: len(data) // 2])
    if case == "binarised_mask":  # a full-size mask made with `!= -1`
        _nifti(root / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz", np.ones(nsd.GRID, np.int16))
    if case == "string_betas":  # session 2 (NIfTI) is fine: nothing is read before every session is checked
        with h5py.File(betas / "betas_session01.hdf5", "w") as f:
            f["betas"] = np.full((750, 40), b"0.5")
    assert convert(_args(root, out)) == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # after any progress bar
    assert err.startswith("error: ") and "Traceback" not in stderr
    expected = {"not_nsdgeneral": ("betas_session01.hdf5", "!= -1"), "voxel_count": ("betas_session01.hdf5", "41 voxels"),
                "missing_session": ("betas_session02", "missing"), "truncated": ("betas_session01.hdf5", "truncated"),
                "nan": ("betas_session01.hdf5", "NaN"), "image_range": ("nsd_expdesign.mat", f"{N_IMAGES} images"),
                "binarised_mask": ("nsdgeneral.nii.gz", "!= -1"),
                "string_betas": ("betas_session01.hdf5: dataset betas holds |S3 values", "numeric")}[case]
    assert all(e in err for e in expected), err
    assert not (out / MANIFEST).exists() and not (out / "subj01").exists()
    assert not out.exists() or case == "nan"  # no scratch left, but the betas z-scored before the failed session


def test_a_recipe_trains_on_converted_nsd(converted, tmp_path, cache, monkeypatch):
    _, out, _ = converted
    run = tmp_path / "ridge"
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    assert train_main.main(["--config", str(ROOT / "train/configs/ridge_clip_tiny.yaml"), f"data.root={out}",
                            f"run_dir={run}", "ridge.alphas=[1,100]", "ridge.folds=2", "clip.tiny.image_size=32"]) == 0
    results = json.loads((run / "test_results.json").read_text())
    assert np.isfinite([v for v in results.values() if isinstance(v, float)]).all()
