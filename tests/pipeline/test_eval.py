"""The eval stage adapter: box-as-mask baselines beside the pseudo-label mIoU; report drawn done."""

from __future__ import annotations

import re
import time

import numpy as np
import pyarrow as pa
import pytest

from exits import manifest, storage
from exits.config import load_config
from exits.data.coco import write_table
from exits.data.prepare import load_instances
from exits.data.synthetic import write_demo_dataset
from exits.label.plan import MASK_SCHEMA
from exits.pipeline.eval import run_eval


def test_eval_adds_box_baselines_and_reports_itself_done(tmp_path) -> None:
    data = write_demo_dataset(str(tmp_path / "data"), num_images=3, image_size=64, seed=0)
    run = str(tmp_path / "run")
    inst, _ = load_instances(data["annotations"], data["images"])
    vinst, _ = load_instances(data["val_annotations"], data["images"])
    write_table(inst, manifest.stage_uri(run, "prepare", "instances.parquet"))
    write_table(vinst, manifest.stage_uri(run, "prepare", "val_instances.parquet"))
    paths = {"annotations": data["annotations"], "images": data["images"],
             "val_annotations": data["val_annotations"], "val_images": data["images"]}  # fmt: skip
    now = time.time()
    manifest.write_manifest(run, "prepare", "fp", now, data=paths)
    held = {"all": {"miou": 0.9, "count": vinst.num_rows}, "missing": 0, "extra": 0}
    manifest.write_manifest(run, "generator", "fp", now, metrics={"pseudo_label": held})
    # the GT masks as the "pseudo labels" (mask parts): mIoU 1, the box baseline below 1
    masks = inst.select(["ann_id", "image_id", "category_id", "bbox"]).append_column(
        "score", pa.array([1.0] * inst.num_rows)
    )
    masks = masks.append_column("segmentation", inst["gt_segmentation"])
    masks = masks.append_column("area", inst["area"])
    masks = masks.append_column("generator", pa.array(["g"] * inst.num_rows))
    masks = masks.append_column("supervision", inst["supervision"]).cast(MASK_SCHEMA)
    write_table(masks, manifest.stage_uri(run, "label", "masks", "shard-00000.parquet"))
    manifest.write_manifest(run, "label", "fp", now, summary={})

    m = run_eval(load_config("demo"), run, "fp")["metrics"]
    assert m["pseudo_label_miou"]["all"]["miou"] == pytest.approx(1.0)
    box = m["pseudo_label_miou_box"]
    assert box["all"]["count"] == m["pseudo_label_miou"]["all"]["count"] == inst.num_rows
    assert 0.3 < box["all"]["miou"] < 1.0 and box["missing"] == 0
    held_box = m["pseudo_label_heldout_box"]
    assert held_box["all"]["count"] == vinst.num_rows and 0.3 < held_box["all"]["miou"] < 1.0
    assert (
        storage.read_json(storage.join(run, "metrics.json"))["pseudo_label_miou_box"]["all"]
        == box["all"]
    )

    page = storage.read_bytes(storage.join(run, "report", "index.html")).decode("utf-8")
    status = re.search(r"<tr><td>eval</td><td[^>]*>([^<]*)</td>", page)
    assert status and status.group(1) == "done"
    assert "box as mask (baseline)" in page
    # the retrieval figure's arrays come from eval (demo: bilateral, no warmup model)
    meta = storage.read_json(manifest.stage_uri(run, "eval", "retrieval_examples.json"))
    assert meta["similarity"] == "bilateral" and meta["grid"] == meta["size"] // 8
    with np.load(manifest.stage_uri(run, "eval", "retrieval_examples.npz")) as z:
        n, k = len(meta["ann_ids"]), meta["grid"] ** 2
        assert z["image"].shape == (n, meta["size"], meta["size"], 3) and z["labels"].shape == (
            n,
            k,
        )
        assert z["labels"].dtype == np.int8 and set(np.unique(z["labels"])) <= {-1, 0, 1}
    assert 'src="retrieval.png"' in page


def test_summary_line_puts_the_box_baseline_beside_the_miou(tmp_path) -> None:
    import json

    from exits.pipeline.runner import summary_line

    m = {"pseudo_label_miou": {"all": {"miou": 0.7, "count": 3}},
         "pseudo_label_miou_box": {"all": {"miou": 0.6, "count": 3}}}  # fmt: skip
    line = json.loads(summary_line({"eval": {"metrics": m}}, str(tmp_path)))
    assert line["pseudo_label_train"]["miou"] == 0.7
    assert line["pseudo_label_train_box"]["miou"] == 0.6
    assert line["pseudo_label_heldout_box"] is None and line["report"] is None
