"""Streamed pseudo-label mIoU and box baseline: hand-computed answers, and the same numbers as
the whole-json computation they replace (exits.evaluate.metrics on the exported json)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from exits import evaluate as ev
from exits.data import rle
from exits.data.coco import INSTANCE_SCHEMA, read_table, write_table
from exits.evaluate import streaming
from exits.evaluate.miou import ExactSum, MiouSums
from exits.label.plan import MASK_SCHEMA

H = W = 16


def square(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return m


def inst(ann_id: int, image_id: int, gt: np.ndarray | None) -> dict:
    """An instance-table row (box supervision: the box is the GT mask's box, or 2..6)."""
    ys, xs = np.nonzero(gt) if gt is not None else ([2, 5], [2, 5])
    bbox = [
        float(min(xs)),
        float(min(ys)),
        float(max(xs) - min(xs) + 1),
        float(max(ys) - min(ys) + 1),
    ]
    return {"image_id": image_id, "ann_id": ann_id, "category_id": 1, "file_name": f"{image_id}.png",
            "height": H, "width": W, "bbox": bbox, "extreme_points": None, "iscrowd": False,
            "area": float(gt.sum()) if gt is not None else bbox[2] * bbox[3],
            "separated": ev.is_separated(gt) if gt is not None else None,
            "supervision": "box", "points_source": "none",
            "gt_segmentation": rle.to_json(rle.encode(gt)) if gt is not None else None}  # fmt: skip


def mask_row(ann_id: int, image_id: int, m: np.ndarray) -> dict:
    return {"ann_id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 1.0],
            "score": 1.0, "segmentation": rle.to_json(rle.encode(m)), "area": float(m.sum()),
            "generator": "g", "supervision": "box"}  # fmt: skip


def write_parts(rows: list[dict], schema: pa.Schema, uri: str, sizes: list[int]) -> None:
    start = 0
    for k, n in enumerate(sizes):
        write_table(pa.Table.from_pylist(rows[start : start + n], schema=schema),
                    f"{uri}/part-{k:05d}.parquet")  # fmt: skip
        start += n
    assert start == len(rows)


def same(a, b) -> bool:
    """Equal dicts, NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_three_known_ious_and_the_bookkeeping(tmp_path) -> None:
    gt = square(2, 2, 4, 4)  # 16 px
    blobs = square(0, 0, 2, 2) | square(8, 8, 2, 2)  # separated, 8 px
    instances = [inst(1, 1, blobs), inst(2, 1, gt), inst(3, 2, gt), inst(4, 2, gt),
                 inst(5, 3, gt), inst(6, 3, None)]  # fmt: skip
    masks = [mask_row(1, 1, blobs),  # IoU 1
             mask_row(2, 1, square(2, 2, 4, 2)),  # 8 of 16 px: IoU 0.5
             mask_row(3, 2, square(2, 2, 2, 2)),  # 4 of 16 px: IoU 0.25
             # 4: no mask row (missing); 5: an empty mask (left out of the export: missing)
             mask_row(5, 3, np.zeros((H, W), bool)),
             mask_row(6, 3, gt),  # its instance has no GT mask: extra
             mask_row(99, 3, gt)]  # no such instance: extra  # fmt: skip
    write_parts(instances, INSTANCE_SCHEMA, str(tmp_path / "inst"), [2, 3, 1])
    write_parts(masks, MASK_SCHEMA, str(tmp_path / "masks"), [3, 3])
    out = streaming.table_pseudo_label_miou(str(tmp_path / "masks"), str(tmp_path / "inst"))
    assert out["all"] == {"miou": pytest.approx((1 + 0.5 + 0.25) / 5), "count": 5}
    assert out["separated"] == {"miou": 1.0, "count": 1}
    assert out["small"]["count"] == 5 and out["medium"]["count"] == 0
    assert (out["missing"], out["extra"], out["no_gt_mask"], out["invalid_pseudo"]) == (2, 2, 1, 0)
    # without the bookkeeping rows: exactly the three known IoUs
    write_parts(instances[1:3] + instances[:1], INSTANCE_SCHEMA, str(tmp_path / "i3"), [3])
    three = streaming.table_pseudo_label_miou(str(tmp_path / "masks"), str(tmp_path / "i3"))
    assert three["all"] == {"miou": 1.75 / 3, "count": 3} and three["missing"] == 0


def test_box_baseline_known_iou(tmp_path) -> None:
    """GT = the left half of its box: the box-as-mask IoU is 0.5; a box-only row is skipped."""
    gt = square(2, 2, 2, 4)
    row = {**inst(1, 1, gt), "bbox": [2.0, 2.0, 4.0, 4.0]}
    write_parts([row, inst(2, 1, None)], INSTANCE_SCHEMA, str(tmp_path / "inst"), [2])
    out = streaming.table_box_baseline_miou(str(tmp_path / "inst"))
    assert out["all"] == {"miou": 0.5, "count": 1}
    assert (out["no_gt_mask"], out["extra"], out["missing"]) == (1, 1, 0)


def test_same_numbers_as_the_whole_json_computation(tmp_path, demo_dataset) -> None:
    """The old eval: pseudo_label_miou(GT json, exported pseudo json) and box_baseline_miou(GT
    json, all rows); the streamed one over parts cut at other places gives the same dicts."""
    from exits.data.prepare import load_instances
    from exits.label.export import export_coco

    table, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    rows = table.to_pylist()
    assert len(rows) > 20 and any(r["separated"] for r in rows)
    masks = []
    for k, r in enumerate(rows):
        m = rle.decode(json.loads(r["gt_segmentation"]))
        if k % 5 == 1:
            continue  # no mask: missing
        if k % 5 == 2:
            m = np.roll(m, 2, axis=1)  # a shifted mask: IoU < 1
        if k % 7 == 3:
            m = np.zeros_like(m)  # empty: left out of the export
        masks.append(mask_row(r["ann_id"], r["image_id"], m))
    masks.sort(key=lambda r: r["image_id"])  # the labeller's shards: images sorted by id
    n = len(rows)
    write_parts(rows, INSTANCE_SCHEMA, str(tmp_path / "inst"), [n // 3, n // 3, n - 2 * (n // 3)])
    write_parts(
        masks, MASK_SCHEMA, str(tmp_path / "masks"), [len(masks) // 2, len(masks) - len(masks) // 2]
    )
    pseudo = str(tmp_path / "pseudo.json")
    export_coco(str(tmp_path / "masks"), demo_dataset["annotations"], pseudo)

    old = ev.pseudo_label_miou(demo_dataset["annotations"], pseudo)
    new = streaming.table_pseudo_label_miou(str(tmp_path / "masks"), str(tmp_path / "inst"))
    assert same(new, old) and 0 < new["all"]["miou"] < 1 and new["missing"] > 0
    old_box = ev.box_baseline_miou(
        demo_dataset["annotations"], read_table(str(tmp_path / "inst")).to_pylist()
    )
    assert same(streaming.table_box_baseline_miou(str(tmp_path / "inst")), old_box)


def test_each_mask_part_is_read_once_per_instance_part_it_overlaps(tmp_path, monkeypatch) -> None:
    # prepare's parts hold images 1-2, 3-4, 5-6; label's shards 1-3, 4-6 (other shard sizes);
    # one GT row per batch: the mask reads do not grow with the batches, only with overlaps
    gt = square(2, 2, 4, 4)
    instances = [inst(i, i, gt) for i in range(1, 7)]
    write_parts(instances, INSTANCE_SCHEMA, str(tmp_path / "inst"), [2, 2, 2])
    write_parts(
        [mask_row(i, i, gt) for i in range(1, 7)], MASK_SCHEMA, str(tmp_path / "masks"), [3, 3]
    )
    monkeypatch.setattr(streaming, "BATCH_ROWS", 1)
    made: list[streaming._MaskParts] = []
    real_init = streaming._MaskParts.__init__

    def recording(self, uri):
        real_init(self, uri)
        made.append(self)

    monkeypatch.setattr(streaming._MaskParts, "__init__", recording)
    out = streaming.table_pseudo_label_miou(str(tmp_path / "masks"), str(tmp_path / "inst"))
    assert out["all"] == {"miou": 1.0, "count": 6} and out["missing"] == 0
    assert made[0].reads == 4  # part 1-2: shard 1-3; 3-4: both shards; 5-6: shard 4-6


def test_exact_sums_do_not_depend_on_the_order() -> None:
    values = [0.1] * 10 + [1e16, -1e16, 1 / 3]
    fwd, rev = ExactSum(), ExactSum()
    for v in values:
        fwd.add(v)
    for v in reversed(values):
        rev.add(v)
    assert fwd.value() == rev.value() == math.fsum(values)
    a, b = MiouSums(), MiouSums()
    a.add(0.5, 10, True)
    b.add(0.25, 2000, False)
    s = a.merge(b).summary()
    assert s["all"] == {"miou": 0.375, "count": 2} and s["separated"] == {"miou": 0.5, "count": 1}
    assert s["medium"] == {"miou": 0.25, "count": 1} and math.isnan(s["large"]["miou"])


@pytest.mark.integration
def test_streams_parts_on_s3(s3_bucket) -> None:
    gt = square(2, 2, 4, 4)
    write_parts([inst(1, 1, gt), inst(2, 2, gt)], INSTANCE_SCHEMA, f"{s3_bucket}/inst", [1, 1])
    write_parts([mask_row(1, 1, gt), mask_row(2, 2, square(2, 2, 4, 2))], MASK_SCHEMA,
                f"{s3_bucket}/masks", [2])  # fmt: skip
    out = streaming.table_pseudo_label_miou(f"{s3_bucket}/masks", f"{s3_bucket}/inst")
    assert out["all"] == {"miou": 0.75, "count": 2}
    assert streaming.table_box_baseline_miou(f"{s3_bucket}/inst")["all"] == {
        "miou": 1.0,
        "count": 2,
    }
