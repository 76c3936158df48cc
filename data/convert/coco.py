"""COCO captions and the 80-category multi-label vectors of NSD's images.

NSD's `nsd_stim_info_merged.csv` maps each image (`nsdId`, 0-based 73k index) to its COCO
image (`cocoId`, `cocoSplit` = train2017 or val2017); the COCO annotation files
`captions_{split}.json` and `instances_{split}.json` give its captions and object categories.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from data.shards import DataError


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def coco_ids(stim_info: Path, nsd_ids: set[int]) -> dict[int, tuple[int, str]]:
    """nsdId -> (cocoId, cocoSplit) for the requested images."""
    if not stim_info.is_file():
        raise DataError(f"{stim_info}: NSD stimulus info file missing")
    found = {}
    with open(stim_info, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"nsdId", "cocoId", "cocoSplit"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{stim_info}: no column(s) {sorted(missing)}")
        for row in reader:
            nsd = int(row["nsdId"])
            if nsd in nsd_ids:
                found[nsd] = (int(row["cocoId"]), row["cocoSplit"])
    absent = sorted(nsd_ids - set(found))
    if absent:
        raise DataError(f"{stim_info}: no row for {len(absent)} of the subject's images (first nsdId {absent[0]})")
    return found


def coco_annotations(stim_info: Path, annotations: Path, nsd_ids: set[int]) -> tuple[list[str], dict[int, tuple[np.ndarray, list[str]]]]:
    """(the 80 category names in COCO id order, nsdId -> (multi-hot float32 [80], captions))."""
    ids = coco_ids(stim_info, nsd_ids)
    wanted: dict[str, set[int]] = {}
    for coco, split in ids.values():
        wanted.setdefault(split, set()).add(coco)
    captions: dict[int, list[str]] = {}
    present: dict[int, set[int]] = {}
    names: dict[int, str] | None = None
    for split, cocos in sorted(wanted.items()):
        for a in _load_json(annotations / f"captions_{split}.json").get("annotations", []):
            if a["image_id"] in cocos:
                captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        instances = _load_json(annotations / f"instances_{split}.json")
        names = names or {c["id"]: c["name"] for c in instances.get("categories", [])}
        for a in instances.get("annotations", []):
            if a["image_id"] in cocos:
                present.setdefault(a["image_id"], set()).add(a["category_id"])
    if not names:
        raise DataError(f"{annotations}: no COCO categories in the instances files")
    order = sorted(names)
    column = {c: i for i, c in enumerate(order)}
    out = {}
    for nsd, (coco, _) in ids.items():
        labels = np.zeros(len(order), np.float32)
        labels[[column[c] for c in present.get(coco, ())]] = 1
        out[nsd] = (labels, captions.get(coco, []))
    return [names[c] for c in order], out
