"""MindEye 1's published shards (tars of nsdgeneral.npy with -1-padded repeats, jpg,
coco73k.npy, trial.npy, num_uniques.npy) re-packed into ours: values, repeats, untouched
JPEGs, captions from NSD's files, one-line errors, and a recipe trained on the result."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.convert.__main__ import main as convert
from data.shards import MANIFEST, load_manifest
from data.splits import iter_split
from launchers import convert as launcher
from tests.conftest import launch
from tests.test_convert_nsd import write_nsd

V = 50
SPLITS = {"train": [14, 13], "val": [6], "test": [5, 5]}  # samples per tar


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _jpg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_mindeye1(root: Path, subject: int = 1, nan: bool = False, drop: str | None = None, wide: bool = False) -> dict:
    """MindEye 1's folder layout; returns {split: [(image id, trials [r, V], jpg bytes)]}."""
    rng = np.random.default_rng(0)
    truth, image_id, trial = {}, 0, 0
    for split, sizes in SPLITS.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        truth[split] = []
        for k, n in enumerate(sizes):
            with tarfile.open(root / split / f"{split}_subj{subject:02d}_{k}.tar", "w") as tar:
                for _ in range(n):
                    repeats = 3 if split == "test" else int(rng.integers(1, 4))
                    voxels = np.full((3, V + (wide and image_id == 5)), -1.0, np.float32)
                    voxels[:repeats] = rng.standard_normal((repeats, voxels.shape[1]))
                    if nan and image_id == 7:
                        voxels[0, 3] = np.nan
                    jpg = _jpg(rng)
                    fields = {"nsdgeneral.npy": _npy(voxels), "jpg": jpg, "coco73k.npy": _npy(np.array([image_id * 7])),
                              "trial.npy": _npy(np.array([trial])), "num_uniques.npy": _npy(np.array([repeats]))}
                    for ext, data in fields.items():
                        if ext == drop and image_id == 4:
                            continue
                        info = tarfile.TarInfo(f"sample{image_id:09d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    truth[split].append((image_id * 7, voxels[:repeats], jpg))
                    image_id, trial = image_id + 1, trial + repeats
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
    assert manifest["categories"] == ["person", "car", "train"]
    for split, expected in truth.items():
        samples = list(iter_split(out, manifest, 1, split, with_images=True))
        assert [s["image_id"] for s in samples] == [e[0] for e in expected]
        for s, (image_id, voxels, jpg) in zip(samples, expected):
            assert s["voxels"].shape == voxels.shape  # -1 rows dropped
            np.testing.assert_allclose(s["voxels"].astype(np.float32), voxels, atol=2e-3, rtol=1e-3)
            assert s["image"] == jpg
            assert s["captions"] == [f"image {image_id} caption 0", f"image {image_id} caption 1"]


@pytest.mark.parametrize("case", ["missing_jpg", "voxel_count", "truncated", "nan"])
def test_bad_mindeye1_shards_get_one_line_errors_naming_the_file(case, tmp_path, capsys):
    root, out = tmp_path / "shards", tmp_path / "out"
    write_mindeye1(root, nan=case == "nan", drop="jpg" if case == "missing_jpg" else None, wide=case == "voxel_count")
    if case == "truncated":
        path = root / "train/train_subj01_1.tar"
        path.write_bytes(path.read_bytes()[:3000])
    assert convert(_args(root, out)) == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]
    expected = {"missing_jpg": ("train_subj01_0.tar", "no jpg"), "voxel_count": ("sample000000005", "51 voxels"),
                "truncated": ("train_subj01_1.tar", "truncated"), "nan": ("train_subj01_0.tar", "NaN")}[case]
    assert err.startswith("error: ") and "Traceback" not in stderr and all(e in err for e in expected), err
    assert not (out / MANIFEST).exists()


def test_a_recipe_trains_on_converted_mindeye1_shards(converted, tmp_path, cache):
    out, _ = converted
    run = tmp_path / "ridge"
    result = launch(["--config", "train/configs/ridge_clip_tiny.yaml", f"data.root={out}", f"run_dir={run}",
                     "ridge.alphas=[1,100]", "ridge.folds=2", "clip.tiny.image_size=32"], 1, cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
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
