"""The GOD, BOLD5000, HCP resting-state and HCP movie converters on tiny files written in each
dataset's published format (the HCP movie: the layout its converter documents): voxels read
back z-scored, splits, image ids, repeats, ROIs, one-line errors naming the file for bad
inputs (string voxels included; integer ones are z-scored), byte-identical resume after a kill
(also when the rerun names the folders by absolute paths), a folder of another dataset refused
before anything is written, a full disk reported as one line naming the path, and recipes
trained on converted folders."""
from __future__ import annotations

import errno
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.convert import output
from data.convert.__main__ import main
from data.shards import MANIFEST, ShardWriter, decode_image, load_manifest, sha256
from data.splits import iter_split, load_split
from tests.conftest import ROOT
from train import main as train_main

SHARD_MB = "0.008"  # a few samples per shard


def convert(dataset: str, root: Path, subject, out: Path, *options: str) -> int:
    return main([dataset, "--root", str(root), "--subject", str(subject), "--out", str(out), "--workers", "1", *options])


def zscorer(trials: np.ndarray, fit_rows):
    """Per-voxel z-scoring with the statistics of `fit_rows` of trials."""
    fit = trials[fit_rows].astype(np.float64)
    mean, std = fit.mean(0), fit.std(0)
    return lambda x: (x - mean) / std


def assert_close(stored, expected) -> None:
    np.testing.assert_allclose(np.asarray(stored, np.float32), expected, atol=3e-3, rtol=2e-3)


def split_sizes(entry: dict) -> dict[str, int]:
    return {name: split["n_samples"] for name, split in entry["splits"].items()}


def damage(path: Path, change) -> None:
    """"missing", "truncated", {npz key: new value from the old, or None to drop it}, or a
    function of a .npy array or of a text file's contents."""
    if change == "missing":
        path.unlink()
    elif change == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif isinstance(change, dict):
        arrays = dict(np.load(path))
        for key, fn in change.items():
            if fn is None:
                del arrays[key]
            else:
                arrays[key] = fn(arrays[key])
        np.savez(path, **arrays)
    elif path.suffix == ".npy":
        np.save(path, change(np.load(path)))
    else:
        path.write_text(change(path.read_text()))


def as_strings(a: np.ndarray) -> np.ndarray:
    return a.astype(str)


def with_nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    a.flat[len(a.flat) // 2] = np.nan
    return a


def assert_rejected(capsys, dataset: str, root: Path, subject, out: Path, names: list[str], *options: str) -> None:
    """The conversion fails with exit code 2 and a one-line error containing every one of
    `names` (the file, and the key or option), and leaves nothing behind (not even scratch)."""
    capsys.readouterr()
    assert convert(dataset, root, subject, out, *options) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and all(n in err for n in names), err
    assert not out.exists()


# GOD ---------------------------------------------------------------------------------------

GOD_VC = np.arange(40) < 30  # the kept voxels


def write_god(root: Path, subject: int) -> dict:
    """sbj_{subject}.npz (12 training images, image 3 shown twice; 4 test images x 3 trials, in
    shuffled order) and images_256.npz (16 px); returns the subject's arrays."""
    rng, v = np.random.default_rng(subject), np.arange(40)
    root.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "images_256.npz", train_images=images[:12], test_images=images[12:])
    sbj = {"arr_0": rng.normal(2, 3, (13, 40)), "arr_1": rng.normal(2, 3, (12, 40)), "arr_2": rng.normal(size=(4, 40)),
           "arr_3": np.append(rng.permutation(12), 3), "arr_4": rng.permutation(np.repeat(np.arange(4.0), 3)),
           "arr_5": rng.random(40), "arr_6": rng.random(40),
           "VC": GOD_VC, "V1": v < 10, "LOC": (v >= 20) & (v < 35), "FFA": v >= 35}
    np.savez(root / f"sbj_{subject}.npz", **sbj)
    return {**sbj, "train_images": images[:12], "test_images": images[12:]}


@pytest.fixture(scope="module")
def god(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("god"), tmp_path_factory.mktemp("god_out")
    inputs = {s: write_god(root, s) for s in (1, 2)}
    for s in (1, 2):
        assert convert("god", root, s, out, "--val", "3") == 0
    return root, out, inputs


def test_god_keeps_the_roi_z_scored_on_training_trials_with_test_ids_shared_by_subjects(god):
    _, out, inputs = god
    manifest = load_manifest(out)
    assert manifest["dataset"] == "god" and manifest["categories"] == [] and not manifest["common_space"]
    entry = manifest["subjects"]["1"]
    assert entry["n_voxels"] == 30 and entry["rois"] == {"LOC": list(range(20, 30)), "V1": list(range(10))}
    assert split_sizes(entry) == {"train": 9, "val": 3, "test": 4}
    assert entry["repeats"] == {"train": [1, 2], "test": [3]}
    for subject, sbj in inputs.items():
        splits = {name: load_split(out, manifest, subject, name) for name in ("train", "val", "test")}
        val_ids = set(splits["val"].image_ids.tolist())
        assert sorted([*splits["train"].image_ids.tolist(), *val_ids]) == list(range(12))
        fit_rows = [r for r, i in enumerate(sbj["arr_3"]) if i not in val_ids]
        z = zscorer(sbj["arr_0"][:, GOD_VC], fit_rows)
        for name, trials, index, offset in (("train", sbj["arr_0"], sbj["arr_3"], 0), ("val", sbj["arr_0"], sbj["arr_3"], 0),
                                            ("test", sbj["arr_1"], sbj["arr_4"], 12)):
            arrays = splits[name]
            assert arrays.image_ids.tolist() == sorted(arrays.image_ids.tolist())
            for n, image_id in enumerate(arrays.image_ids.tolist()):
                rows = np.flatnonzero(index == image_id - offset)
                assert int(arrays.n_repeats[n]) == len(rows) == (3 if name == "test" else 1 + (image_id == 3))
                assert_close(arrays.voxels[n, : len(rows)], z(trials[rows][:, GOD_VC]))
        assert splits["test"].image_ids.tolist() == [12, 13, 14, 15]
        for sample in iter_split(out, manifest, subject, "val", with_images=True):
            assert (decode_image(sample["image"]) == sbj["train_images"][sample["image_id"]]).all()
            assert sample["labels"].shape == (0,) and sample["captions"] == []


GOD_BAD = {  # file, change, what the error names besides the file
    "missing file": ("images_256.npz", "missing", ""),
    "truncated file": ("sbj_1.npz", "truncated", ""),
    "nan": ("sbj_1.npz", {"arr_0": with_nan}, "'arr_0'"),
    "voxel counts differ": ("sbj_1.npz", {"arr_1": lambda a: a[:, :-1]}, "'arr_1'"),
    "image index out of range": ("sbj_1.npz", {"arr_3": lambda a: np.append(a[:-1], 12)}, "'arr_3'"),
    "arr_4 labels the averages": ("sbj_1.npz", {"arr_4": lambda a: np.arange(4)}, "'arr_4'"),
    "no such roi": ("sbj_1.npz", {"VC": None}, "'VC'"),
    "images of another size": ("images_256.npz", {"test_images": lambda a: a[:, :8]}, "'test_images'"),
    "string voxels": ("sbj_1.npz", {"arr_1": as_strings}, "'arr_1' holds <U"),
}


@pytest.mark.parametrize("case", GOD_BAD)
def test_bad_god_inputs_get_one_line_errors_naming_the_file(case, tmp_path, capsys):
    root = tmp_path / "god"
    write_god(root, 1)
    name, change, key = GOD_BAD[case]
    damage(root / name, change)
    assert_rejected(capsys, "god", root, 1, tmp_path / "out", [str(root / name), key])


def test_ridge_clip_trains_on_converted_god(god, tmp_path, cache, monkeypatch):
    _, out, _ = god
    run = tmp_path / "ridge"
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    assert train_main.main(["--config", str(ROOT / "train/configs/ridge_clip_tiny.yaml"), f"data.root={out}", "data.subject=1",
                            f"run_dir={run}", "ridge.alphas=[1,100]", "ridge.folds=3", "clip.tiny.image_size=32"]) == 0
    results = json.loads((run / "test_results.json").read_text())
    assert results["n_full"] == 4 and np.isfinite([v for v in results.values() if isinstance(v, float)]).all()
    assert (run / "checkpoints" / "ridge" / "model.pt").is_file()


# BOLD5000 ----------------------------------------------------------------------------------

STIMULI = {"COCO": ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg", "COCO_val2014_000000000042.jpg"],
           "ImageNet": ["n01440764_10026.JPEG", "n01443537_1000.JPEG", "n02085620_1152.JPEG"],
           "Scene": ["airplanecabin1.jpg", "bedroom2.png", "zoo3.jpg"]}
NAMES = sorted(n for names in STIMULI.values() for n in names)  # image_id = position
REPEATED = ["COCO_train2014_000000000025.jpg", "n01443537_1000.JPEG"]  # shown 3 times each
SHOWN_ONCE = [n for n in NAMES if n not in REPEATED and n != "zoo3.jpg"]  # zoo3 is never shown
BETAS = "betas/CSI{}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{}.npy"
BOLD_ROIS = [h + r for h in ("LH", "RH") for r in ("EarlyVis", "LOC", "OPA", "PPA", "RSC")]


def write_bold5000(root: Path, subject: int) -> dict:
    """The stimuli (16 px, one PNG), the subject's stimulus list (12 trials) and ten ROI beta
    files; returns the trials' names and the betas side by side."""
    rng = np.random.default_rng(subject)
    for folder, names in STIMULI.items():
        (root / "Presented_Stimuli" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            pixels = np.random.default_rng(NAMES.index(name)).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "Presented_Stimuli" / folder / name,
                                         format="PNG" if name.endswith(".png") else "JPEG")
    names = list(rng.permutation(SHOWN_ONCE + REPEATED * 3))
    listed = [f"rep_{n}" if n in names[:k] else n for k, n in enumerate(names)]
    (root / "stim_lists").mkdir(exist_ok=True)
    (root / "stim_lists" / f"CSI0{subject}_stim_lists.txt").write_text("\n".join(listed) + "\n")
    (root / "betas").mkdir(exist_ok=True)
    betas = []
    for roi in BOLD_ROIS:
        betas.append(rng.normal(1, 2, (len(names), int(rng.integers(2, 5)))).astype(np.float32))
        np.save(root / BETAS.format(subject, roi), betas[-1])
    return {"names": names, "trials": np.concatenate(betas, axis=1), "sizes": [b.shape[1] for b in betas]}


def test_bold5000_groups_trials_by_image_and_keeps_the_published_jpeg_bytes(tmp_path):
    root, out = tmp_path / "bold5000", tmp_path / "out"
    inputs = {s: write_bold5000(root, s) for s in (1, 2)}
    for s in inputs:
        assert convert("bold5000", root, s, out, "--val", "2") == 0
    manifest = load_manifest(out)
    assert manifest["dataset"] == "bold5000" and manifest["categories"] == []
    for subject, truth in inputs.items():
        entry = manifest["subjects"][str(subject)]
        assert entry["n_voxels"] == truth["trials"].shape[1]
        assert split_sizes(entry) == {"train": 4, "val": 2, "test": 2} and entry["test_repeats"] == [3]
        starts = np.cumsum([0, *truth["sizes"]])
        assert entry["rois"]["RHLOC"] == list(range(starts[6], starts[7]))
        assert entry["rois"]["LOC"] == [*range(starts[1], starts[2]), *range(starts[6], starts[7])]
        assert len(entry["rois"]) == 15
        names = np.array(truth["names"])
        splits = {name: load_split(out, manifest, subject, name) for name in ("train", "val", "test")}
        assert splits["test"].image_ids.tolist() == sorted(NAMES.index(n) for n in REPEATED)
        assert sorted(splits["train"].image_ids.tolist() + splits["val"].image_ids.tolist()) == \
            sorted(NAMES.index(n) for n in SHOWN_ONCE)
        z = zscorer(truth["trials"], [np.flatnonzero(names == NAMES[i])[0] for i in splits["train"].image_ids.tolist()])
        for arrays in splits.values():
            for n, image_id in enumerate(arrays.image_ids.tolist()):
                rows = np.flatnonzero(names == NAMES[image_id])
                assert int(arrays.n_repeats[n]) == len(rows)
                assert_close(arrays.voxels[n, : len(rows)], z(truth["trials"][rows]))
        for name in ("train", "val", "test"):
            for sample in iter_split(out, manifest, subject, name, with_images=True):
                path = next((root / "Presented_Stimuli").glob(f"*/{NAMES[sample['image_id']]}"))
                if path.suffix == ".png":
                    assert (decode_image(sample["image"]) == np.array(Image.open(path))).all()
                else:
                    assert sample["image"] == path.read_bytes()


BOLD_BAD = {  # file, change, what the error names besides the file
    "missing beta file": (BETAS.format(1, "RHPPA"), "missing", ""),
    "trial counts differ": (BETAS.format(1, "RHLOC"), lambda a: a[:-1], "trials"),
    "nan": (BETAS.format(1, "LHOPA"), with_nan, "NaN"),
    "list shorter than the trials": ("stim_lists/CSI01_stim_lists.txt", lambda t: t.split("\n", 1)[1], "12 trials"),
    "unknown image": ("stim_lists/CSI01_stim_lists.txt", lambda t: "nothere.jpg\n" + t.split("\n", 1)[1], "nothere.jpg"),
    "truncated image": ("Presented_Stimuli/ImageNet/n01440764_10026.JPEG", "truncated", "unreadable image"),
    "string voxels": (BETAS.format(1, "RHRSC"), as_strings, "holds <U"),
    "object voxels": (BETAS.format(1, "LHLOC"), lambda a: a.astype(object), "Object arrays"),
}


@pytest.mark.parametrize("case", BOLD_BAD)
def test_bad_bold5000_inputs_get_one_line_errors_naming_the_file(case, tmp_path, capsys):
    root = tmp_path / "bold5000"
    write_bold5000(root, 1)
    name, change, detail = BOLD_BAD[case]
    damage(root / name, change)
    assert_rejected(capsys, "bold5000", root, 1, tmp_path / "out", [str(root / name), detail])


# HCP resting state -------------------------------------------------------------------------

HCP_IDS = (100307, 100408)
REST_ROIS = {"V1": 12, "V2": 16, "V3": 20, "V4": 16}


def write_hcp_rest(root: Path, hcp_id: int) -> np.ndarray:
    """<id>/HCP_visual_voxel.npz (200 TRs, 64 voxels); returns the voxels side by side."""
    rng = np.random.default_rng(hcp_id)
    rois = {name: rng.normal(5, 2, (200, n)).astype(np.float32) for name, n in REST_ROIS.items()}
    (root / str(hcp_id)).mkdir(parents=True, exist_ok=True)
    np.savez(root / str(hcp_id) / "HCP_visual_voxel.npz", **rois)
    return np.concatenate(list(rois.values()), axis=1)


@pytest.fixture(scope="module")
def hcp_rest(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("hcp_rest"), tmp_path_factory.mktemp("hcp_rest_out")
    inputs = {s: write_hcp_rest(root, s) for s in HCP_IDS}
    for s in HCP_IDS:
        assert convert("hcp-rest", root, s, out) == 0
    return out, inputs


def test_hcp_rest_averages_z_scored_windows_into_contiguous_splits(hcp_rest):
    out, inputs = hcp_rest
    manifest = load_manifest(out)
    assert manifest["dataset"] == "hcp-rest" and manifest["common_space"] and list(manifest["subjects"]) == ["100307", "100408"]
    for subject, run in inputs.items():
        entry = manifest["subjects"][str(subject)]
        assert entry["n_voxels"] == 64 and entry["rois"]["V3"] == list(range(28, 48))
        assert split_sizes(entry) == {"train": 16, "val": 2, "test": 2}
        windows = zscorer(run, slice(None))(run).reshape(20, 10, 64).mean(1)
        for name, ids in (("train", range(16)), ("val", [16, 17]), ("test", [18, 19])):
            arrays = load_split(out, manifest, subject, name)
            assert arrays.image_ids.tolist() == list(ids) and (arrays.n_repeats == 1).all()
            assert_close(arrays.voxels[:, 0], windows[list(ids)])
        sample = next(iter_split(out, manifest, subject, "test", with_images=True))
        assert sample["image"] is None and sample["labels"].shape == (0,)


HCP_REST_BAD = {  # hcp id, change to its file, options, what the error names besides the file
    "missing subject": (100999, None, [], ""),
    "missing key": (100307, {"V3": None}, [], "'V3'"),
    "TR counts differ": (100307, {"V2": lambda a: a[:-1]}, [], "'V2'"),
    "inf": (100307, {"V4": lambda a: np.where(a > 7, np.inf, a)}, [], "'V4'"),
    "windows too long for the splits": (100307, None, ["--window", "100"], "--window 100"),
    "string voxels": (100307, {"V1": as_strings}, [], "'V1' holds <U"),
}


@pytest.mark.parametrize("case", HCP_REST_BAD)
def test_bad_hcp_rest_inputs_get_one_line_errors_naming_the_file(case, tmp_path, capsys):
    root = tmp_path / "hcp"
    write_hcp_rest(root, 100307)
    hcp_id, change, options, detail = HCP_REST_BAD[case]
    path = root / str(hcp_id) / "HCP_visual_voxel.npz"
    if change:
        damage(path, change)
    assert_rejected(capsys, "hcp-rest", root, hcp_id, tmp_path / "out", [str(path), detail], *options)


def test_mbm_pretrains_on_converted_hcp_rest(hcp_rest, tmp_path, cache, monkeypatch):
    out, _ = hcp_rest
    run = tmp_path / "mbm"
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    assert train_main.main(["--config", str(ROOT / "train/configs/mbm_tiny.yaml"), f"data.root={out}",
                            "data.heldout_subjects=[100408]", "data.loader=memory", "train.epochs=2", "train.batch_size=8",
                            "model.dim=32", "model.depth=1", "model.decoder_dim=32", "model.decoder_depth=1",
                            "ds.bf16.enabled=false", f"run_dir={run}"]) == 0
    results = json.loads((run / "test_results.json").read_text())
    assert results["n_subjects"] == 1 and np.isfinite([results["masked_mse"], results["masked_r"]]).all()
    assert (run / "checkpoints" / "latest").is_file()


# HCP movie ---------------------------------------------------------------------------------

CLASSES = ["dog", "car", "tree"]
MOVIE_TRS = {1: 24, 2: 24, 3: 24, 4: 20}


def write_hcp_movie(root: Path, hcp_id: int) -> dict:
    """stimuli/ (8 px frames, labels with some empty rows, classes.txt) and the subject's four
    runs of 12 voxels; returns the stimuli and voxels per run."""
    rng = np.random.default_rng(0)
    (root / "stimuli").mkdir(parents=True, exist_ok=True)
    (root / "stimuli" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    truth = {}
    for run, n in MOVIE_TRS.items():
        frames = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        labels = rng.random((n, 3)) < 0.4
        np.savez(root / "stimuli" / f"MOVIE{run}.npz", frames=frames, labels=labels)
        truth[run] = {"frames": frames, "labels": labels}
    (root / str(hcp_id)).mkdir(exist_ok=True)
    vox = np.random.default_rng(hcp_id)
    for run, n in MOVIE_TRS.items():
        truth[run]["voxels"] = vox.normal(0, 3, (n, 12)).astype(np.float32)
        np.save(root / str(hcp_id) / f"MOVIE{run}.npy", truth[run]["voxels"])
    return truth


def test_hcp_movie_pairs_each_labelled_frame_with_the_voxels_delay_trs_later(tmp_path):
    root, out, delay = tmp_path / "movie", tmp_path / "out", 2
    inputs = {s: write_hcp_movie(root, s) for s in HCP_IDS}
    for s in HCP_IDS:
        assert convert("hcp-movie", root, s, out, "--delay", str(delay), "--val-fraction", "0.25") == 0
    manifest = load_manifest(out)
    assert manifest["categories"] == CLASSES and manifest["common_space"]
    for subject, truth in inputs.items():
        items = {"train": [], "val": [], "test": []}  # (run, t) by the documented rule
        for run, n in MOVIE_TRS.items():
            kept = [(run, t) for t in range(n - delay) if truth[run]["labels"][t].any()]
            n_val = round(len(kept) * 0.25)
            items["test" if run == 4 else "train"] += kept if run == 4 else kept[: len(kept) - n_val]
            items["val"] += [] if run == 4 else kept[len(kept) - n_val :]
        entry = manifest["subjects"][str(subject)]
        assert split_sizes(entry) == {k: len(v) for k, v in items.items()} and entry["n_voxels"] == 12
        assert entry["unlabelled_trs_skipped"] == sum(MOVIE_TRS.values()) - 4 * delay - sum(map(len, items.values()))
        train = np.stack([truth[r]["voxels"][t + delay] for r, t in items["train"]])
        z = zscorer(train, slice(None))
        for name, pairs in items.items():
            samples = list(iter_split(out, manifest, subject, name, with_images=True))
            assert [s["image_id"] for s in samples] == [r * 100000 + t for r, t in pairs]
            for sample, (run, t) in zip(samples, pairs):
                assert_close(sample["voxels"], z(truth[run]["voxels"][t + delay][None]))
                assert (decode_image(sample["image"]) == truth[run]["frames"][t]).all()
                labels = truth[run]["labels"][t]
                assert sample["labels"].tolist() == labels.astype(float).tolist()
                assert sample["captions"] == [", ".join(c for c, on in zip(CLASSES, labels) if on)]


HCP_MOVIE_BAD = {  # damaged file (<id>: the subject's folder), change, the file the error names, and what besides
    "missing class list": ("stimuli/classes.txt", "missing", None, ""),
    "voxel counts differ between runs": ("<id>/MOVIE2.npy", lambda a: a[:, :-1], None, "MOVIE1.npy"),
    "voxels and frames disagree": ("<id>/MOVIE3.npy", lambda a: a[:-1], None, "MOVIE3.npz"),
    "labels not 0 or 1": ("stimuli/MOVIE1.npz", {"labels": lambda a: a * 2.0}, None, "'labels'"),
    "truncated voxels": ("<id>/MOVIE4.npy", "truncated", None, ""),
    "nan voxels": ("<id>/MOVIE1.npy", with_nan, None, "NaN"),
    "string voxels": ("<id>/MOVIE2.npy", as_strings, None, "holds <U"),
    "a class more than the labels": ("stimuli/classes.txt", lambda t: t + "cat\n", "stimuli/MOVIE1.npz", "'labels'"),
}


@pytest.mark.parametrize("case", HCP_MOVIE_BAD)
def test_bad_hcp_movie_inputs_get_one_line_errors_naming_the_file(case, tmp_path, capsys):
    root = tmp_path / "movie"
    write_hcp_movie(root, 100307)
    damaged, change, named, detail = HCP_MOVIE_BAD[case]
    damage(root / damaged.replace("<id>", "100307"), change)
    named = root / (named or damaged).replace("<id>", "100307")
    assert_rejected(capsys, "hcp-movie", root, 100307, tmp_path / "out", [str(named), detail])


# Resume ------------------------------------------------------------------------------------

CONVERSIONS = {  # dataset -> (write the inputs of one subject, subject, options)
    "god": (write_god, 1, ["--val", "3"]),
    "bold5000": (write_bold5000, 1, ["--val", "2"]),
    "hcp-rest": (write_hcp_rest, 100307, []),
    "hcp-movie": (write_hcp_movie, 100307, ["--delay", "2"]),
}


def interrupted(monkeypatch, after: int, run) -> None:
    """`run()` killed (KeyboardInterrupt) as it writes its sample number `after` into a shard."""
    real_write, written = ShardWriter.write_encoded, []

    def write_then_die(self, key, fields):
        if len(written) == after:
            raise KeyboardInterrupt
        written.append(key)
        real_write(self, key, fields)

    monkeypatch.setattr(ShardWriter, "write_encoded", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ShardWriter, "write_encoded", real_write)


@pytest.mark.parametrize("dataset", CONVERSIONS)
def test_a_killed_conversion_resumes_to_byte_identical_shards(dataset, tmp_path, monkeypatch):
    write, subject, options = CONVERSIONS[dataset]
    root, resumed, whole = tmp_path / "in", tmp_path / "resumed", tmp_path / "whole"
    write(root, subject)
    options = [*options, "--shard-mb", SHARD_MB]
    assert convert(dataset, root, subject, whole, *options) == 0

    interrupted(monkeypatch, 7, lambda: convert(dataset, root, subject, resumed, *options))
    state = json.loads(next(resumed.glob(".convert/*/state.json")).read_text())
    assert sum(len(shards) for shards in state["splits"].values()) >= 1 and not (resumed / MANIFEST).exists()
    assert convert(dataset, root, subject, resumed, *options) == 0

    assert (resumed / MANIFEST).read_text() == (whole / MANIFEST).read_text()
    shards = load_manifest(whole)["shards"]
    assert len(shards) > 3
    assert all(sha256(resumed / rel) == sha256(whole / rel) == record["sha256"] for rel, record in shards.items())
    assert sorted(p.relative_to(resumed).as_posix() for p in resumed.glob("subj*/*")) == sorted(shards)


def test_a_rerun_naming_the_folders_by_absolute_paths_resumes_a_relative_one(tmp_path, monkeypatch):
    write_hcp_rest(tmp_path / "in", 100307)
    monkeypatch.chdir(tmp_path)
    options = ["--shard-mb", SHARD_MB]
    interrupted(monkeypatch, 7, lambda: convert("hcp-rest", Path("in"), 100307, Path("out"), *options))
    state = json.loads((tmp_path / "out/.convert/subj100307/state.json").read_text())
    assert state["args"]["args"]["root"] == str(tmp_path / "in") and state["splits"]
    assert convert("hcp-rest", tmp_path / "in", 100307, tmp_path / "out", *options) == 0
    assert load_manifest(tmp_path / "out")["subjects"]["100307"]["converted_with"]["root"] == str(tmp_path / "in")


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_another_dataset_is_refused_before_anything_is_written(tmp_path, capsys):
    """Another subject (written only to fail at the manifest before), and the same subject
    number (said to be "already converted" before)."""
    out = tmp_path / "out"
    write_god(tmp_path / "god", 1)
    assert convert("god", tmp_path / "god", 1, out, "--val", "3") == 0
    before = folder_contents(out)
    write_hcp_rest(tmp_path / "hcp", 100307)
    write_bold5000(tmp_path / "bold5000", 1)
    for dataset, root, subject, options in (("hcp-rest", tmp_path / "hcp", 100307, []),
                                            ("bold5000", tmp_path / "bold5000", 1, ["--val", "2"])):
        capsys.readouterr()
        assert convert(dataset, root, subject, out, *options) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {out}: holds dataset 'god' (converter data.convert.god version 1), not {dataset} "
                       f"(data.convert.{dataset.replace('-', '_')} version 1); convert {dataset} subject {subject} "
                       "into another folder"), err
        assert folder_contents(out) == before


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_a_full_disk_is_one_line_naming_the_path_and_the_rerun_completes(where, tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "in", tmp_path / "out"
    write_hcp_rest(root, 100307)

    def full(*args, **kwargs):
        if where == "shard":  # as a tar's file object raises it: naming no file
            raise OSError(errno.ENOSPC, "No space left on device")
        if Path(args[0]).name != MANIFEST:
            return real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    if where == "shard":
        monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    else:
        real = output.atomic_write_text
        monkeypatch.setattr(output, "atomic_write_text", full)
    assert convert("hcp-rest", root, 100307, out) == 2
    named = out / ("subj100307/train-*.tar" if where == "shard" else MANIFEST)
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {named}: no space left on the device"
    assert not list(out.rglob(".*.tmp*"))  # no unfinished file left taking space
    monkeypatch.undo()
    assert convert("hcp-rest", root, 100307, out) == 0
    assert split_sizes(load_manifest(out)["subjects"]["100307"]) == {"train": 16, "val": 2, "test": 2}


def test_integer_voxels_are_z_scored_like_any_others(tmp_path):
    root, out = tmp_path / "god", tmp_path / "out"
    write_god(root, 1)
    damage(root / "sbj_1.npz", {key: lambda a: np.round(a * 100).astype(np.int16) for key in ("arr_0", "arr_1")})
    assert convert("god", root, 1, out, "--val", "3") == 0
    trials, _ = load_split(out, load_manifest(out), 1, "train").trials()
    assert abs(trials.mean(0)).max() < 0.01 and abs(trials.std(0, unbiased=False) - 1).max() < 0.01


def test_recipes_train_on_converted_bold5000_and_hcp_movie(tmp_path, cache, monkeypatch):
    """The ridge baseline on BOLD5000 (JPEG and PNG stimuli); CLIP-MUSED, the recipe HCP
    movie data is for, on two converted subjects together."""
    bold, movie, out = tmp_path / "bold5000", tmp_path / "movie", tmp_path / "out"
    write_bold5000(bold, 1)
    assert convert("bold5000", bold, 1, out / "bold5000", "--val", "2") == 0
    for s in HCP_IDS:
        write_hcp_movie(movie, s)
        assert convert("hcp-movie", movie, s, out / "movie") == 0
    runs = {"bold5000": ["--config", str(ROOT / "train/configs/ridge_clip_tiny.yaml"), "ridge.alphas=[1,100]",
                         "ridge.folds=2", "clip.tiny.image_size=32"],
            "movie": ["--config", str(ROOT / "train/configs/clip_mused_tiny.yaml"), "model.patch_size=4", "train.epochs=2",
                      "train.batch_size=8", "ds.bf16.enabled=false"]}
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    for name, args in runs.items():
        run = tmp_path / f"run_{name}"
        assert train_main.main([*args, f"data.root={out / name}", f"run_dir={run}"]) == 0, name
        results = json.loads((run / "test_results.json").read_text())
        assert np.isfinite([v for v in results.values() if isinstance(v, float)]).all(), results
