"""Streaming COCO export == the former in-memory export; bench/scale.py runs tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from exits.data.coco import read_table, write_table
from exits.data.prepare import load_instances
from exits.label.export import annotation_from_row, export_coco
from exits.label.plan import MASK_SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_memory_export(masks_dir: str, source: str) -> dict:
    """The export as it was before streaming: every row in one list, one json.dumps."""
    files = sorted(os.path.join(masks_dir, f) for f in os.listdir(masks_dir))
    rows = pa.concat_tables([read_table(f) for f in files]).sort_by("ann_id").to_pylist()
    src = json.load(open(source))
    out = {k: src[k] for k in ("info", "licenses") if k in src}
    out.update(images=src.get("images", []), categories=src.get("categories", []),
               annotations=[annotation_from_row(r) for r in rows if r["area"]])  # fmt: skip
    return json.loads(json.dumps(out))


def test_streaming_export_equals_in_memory_export(demo_dataset, tmp_path):
    inst, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    n = inst.num_rows
    masks = pa.table({
        "ann_id": inst["ann_id"], "image_id": inst["image_id"], "category_id": inst["category_id"],
        "bbox": inst["bbox"], "score": pa.array(np.linspace(0, 1, n)),
        "segmentation": inst["gt_segmentation"],
        "area": pa.array([0.0 if i % 7 == 0 else a for i, a in enumerate(inst["area"].to_pylist())]),
        "generator": pa.array(["g"] * n), "supervision": inst["supervision"],
    }).cast(MASK_SCHEMA)  # fmt: skip
    masks_dir = tmp_path / "masks"
    for k in range(3):  # shards with interleaved ann ids
        write_table(
            masks.take(pa.array(np.arange(k, n, 3))), str(masks_dir / f"shard-{k:05d}.parquet")
        )
    src = json.load(open(demo_dataset["annotations"]))
    src["info"] = {"description": "demo ✓"}
    source = tmp_path / "source.json"
    source.write_text(json.dumps(src))
    out = tmp_path / "pseudo_coco.json"
    stats = export_coco(str(masks_dir), str(source), str(out))
    new, old = json.load(open(out)), in_memory_export(str(masks_dir), str(source))
    assert stats == {"images": len(old["images"]), "categories": len(old["categories"]),
                     "annotations": len(old["annotations"]),
                     "skipped_empty": n - len(old["annotations"]), "below_min_score": 0}  # fmt: skip
    # same json; annotations come shard by shard (each sorted by id), not globally by id
    new["annotations"].sort(key=lambda a: a["id"])
    assert new == old
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_min_score_leaves_weak_masks_out_of_the_json_only(demo_dataset, tmp_path):
    """label.min_score: masks below it are not exported (and counted); the Parquet keeps them."""
    inst, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    n = inst.num_rows
    scores = np.round(np.linspace(0.0, 1.0, n), 6)
    area = [0.0 if i == n - 1 else a for i, a in enumerate(inst["area"].to_pylist())]
    masks = pa.table({
        "ann_id": inst["ann_id"], "image_id": inst["image_id"], "category_id": inst["category_id"],
        "bbox": inst["bbox"], "score": pa.array(scores), "segmentation": inst["gt_segmentation"],
        "area": pa.array(area), "generator": pa.array(["g"] * n), "supervision": inst["supervision"],
    }).cast(MASK_SCHEMA)  # fmt: skip
    write_table(masks, str(tmp_path / "masks" / "shard-00000.parquet"))
    out = tmp_path / "pseudo.json"
    stats = export_coco(str(tmp_path / "masks"), demo_dataset["annotations"], str(out),
                        min_score=0.5)  # fmt: skip
    # the last row (score 1) is empty: skipped as empty, not as weak
    below = int((scores[:-1] < 0.5).sum())
    assert stats["skipped_empty"] == 1 and stats["below_min_score"] == below
    anns = json.load(open(out))["annotations"]
    assert len(anns) == stats["annotations"] == n - 1 - below
    want = {
        int(a): float(s) for a, s in zip(inst["ann_id"].to_pylist()[:-1], scores[:-1]) if s >= 0.5
    }
    assert {a["id"]: a["score"] for a in anns} == want
    assert read_table(str(tmp_path / "masks" / "shard-00000.parquet")).num_rows == n
    off = export_coco(str(tmp_path / "masks"), demo_dataset["annotations"], str(out))
    assert off["below_min_score"] == 0 and off["annotations"] == n - 1


@pytest.mark.slow
def test_bench_scale_tiny(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "bench", "scale.py"), "--instances", "300",
           "--no-ray", "--shard-images", "8", "--workdir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("instances", "prepare_s", "prepare_instances_per_s", "driver_peak_rss_gb",
                "worker_peak_rss_gb", "export_s", "export_peak_rss_gb"):  # fmt: skip
        assert key in result, key
    assert result["instances"] == result["exported_annotations"] == 300
    assert result["shards"] >= 3 and os.listdir(tmp_path) == []
