"""Peak memory and speed of the NSD converter at NSD's real grid and voxel count.

Writes an NSD-layout download with the func1pt8mm grid (81 x 104 x 83), a 15,724-voxel
nsdgeneral, `--sessions` sessions of 750 int16 volumes (HDF5) and 425 px stimuli, converts
subject 1 in a child process and reports its peak RSS (of the main process; the
`--workers` encoding processes only hold the samples in flight) and time. Run it for two session
counts: if memory is bounded, the peak does not grow with the subject's size.

    OMP_NUM_THREADS=2 python benchmarks/convert_nsd_memory.py --sessions 2 4 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

GRID, VOXELS, SIZE = (81, 104, 83), 15724, 425
MEASURE = """import json, resource, sys
from data.convert.__main__ import main
assert main(json.loads(sys.argv[1])) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"""


def write_download(root: Path, sessions: int) -> None:
    rng = np.random.default_rng(0)
    general = np.full(GRID, -1, np.int16)
    general[10:70, 10:95, 10:75] = 0
    flat = general.reshape(-1)
    inside = np.flatnonzero(flat == 0)
    flat[rng.choice(inside, VOXELS, replace=False)] = 1
    streams = np.where(general > 0, rng.integers(1, 8, GRID), 0).astype(np.int16)
    roi = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    roi.mkdir(parents=True)
    for name, data in (("nsdgeneral", general), ("streams", streams)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), roi / f"{name}.nii.gz")
    trials = sessions * 750
    n_images = trials // 3 + 50
    design = root / "nsddata/experiments/nsd"
    design.mkdir(parents=True)
    subjectim = np.ones((8, 10000), np.int64)
    subjectim[0, :n_images] = np.arange(n_images) + 1
    order = np.ones(30000, np.int64)
    order[:trials] = rng.permutation(np.resize(np.arange(n_images), trials)) + 1
    scipy.io.savemat(design / "nsd_expdesign.mat", {"masterordering": order[None], "subjectim": subjectim,
                                                     "sharedix": np.arange(1, 51)[None]})
    with open(design / "nsd_stim_info_merged.csv", "w") as f:
        f.write("cocoId,cocoSplit,nsdId\n" + "".join(f"{i},train2017,{i}\n" for i in range(n_images)))
    annotations = root / "annotations"
    annotations.mkdir()
    caps = [{"image_id": i, "caption": f"a photo {i}"} for i in range(n_images)]
    (annotations / "captions_train2017.json").write_text(json.dumps({"annotations": caps}))
    cats = [{"id": c, "name": f"category {c}"} for c in range(1, 81)]
    inst = [{"image_id": i, "category_id": 1 + i % 80} for i in range(n_images)]
    (annotations / "instances_train2017.json").write_text(json.dumps({"categories": cats, "annotations": inst}))
    stimuli = root / "nsddata_stimuli/stimuli/nsd"
    stimuli.mkdir(parents=True)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    with h5py.File(stimuli / "nsd_stimuli.hdf5", "w") as f:
        brick = f.create_dataset("imgBrick", (n_images, SIZE, SIZE, 3), np.uint8)
        for i in range(n_images):  # smooth images, as photographs compress
            brick[i] = ((ramp[:, None, None] * (i % 7 + 1) + ramp[None, :, None] * np.array([1, 2, 3])) % 256).astype(np.uint8)
    betas = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    betas.mkdir(parents=True)
    for k in range(sessions):
        with h5py.File(betas / f"betas_session{k + 1:02d}.hdf5", "w") as f:
            ds = f.create_dataset("betas", (750, *GRID[::-1]), np.int16)
            for t in range(0, 750, 50):
                ds[t : t + 50] = rng.integers(-900, 900, (50, *GRID[::-1]), dtype=np.int16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[2, 4])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results = []
    for sessions in args.sessions:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "nsd"
            write_download(root, sessions)
            argv = ["nsd", "--root", str(root), "--subject", "1", "--out", str(Path(tmp) / "out"), "--sessions",
                    str(sessions), "--coco", str(root / "annotations"), "--workers", str(args.workers), "--shard-mb", "256"]
            start = time.perf_counter()
            peak = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(argv)], check=True, capture_output=True,
                                   text=True).stdout.split()[-1]
            seconds = time.perf_counter() - start
            size = sum(f.stat().st_size for f in (Path(tmp) / "out").rglob("*.tar")) / 2**20
            results.append({"sessions": sessions, "trials": sessions * 750, "seconds": round(seconds, 1),
                            "peak_rss_mib": int(peak), "shards_mib": round(size)})
            print(results[-1], flush=True)
            shutil.rmtree(root)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
