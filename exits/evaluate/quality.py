"""Pseudo-label quality of a generator on held-out instances with GT masks (stage 1b metric)."""

from __future__ import annotations

import json

import pyarrow as pa
from torch import nn

from exits.config import LabelConfig
from exits.data import rle
from exits.data.crops import INFERENCE_ENLARGE
from exits.evaluate.metrics import pseudo_label_miou
from exits.inference import masks_for_rows


def gt_json_from_table(table: pa.Table) -> dict:
    """A minimal COCO GT dict from instance-table rows that carry GT masks."""
    rows = [r for r in table.to_pylist() if r.get("gt_segmentation")]
    images = {
        r["image_id"]: {
            "id": r["image_id"],
            "height": r["height"],
            "width": r["width"],
            "file_name": r["file_name"],
        }
        for r in rows
    }
    anns = [
        {"id": r["ann_id"], "image_id": r["image_id"], "category_id": r["category_id"], "iscrowd": 0,
         "segmentation": json.loads(r["gt_segmentation"]), "area": r["area"], "bbox": r["bbox"]}
        for r in rows
    ]  # fmt: skip
    cats = [{"id": c} for c in sorted({r["category_id"] for r in rows})]
    return {"images": list(images.values()), "annotations": anns, "categories": cats}


def pseudo_json(rows_masks, threshold: float) -> dict:
    """COCO-like dict of thresholded masks keyed by the instances' ann ids."""
    anns = []
    for row, prob in rows_masks:
        m = prob >= threshold
        anns.append({"id": row["ann_id"], "image_id": row["image_id"], "category_id": row["category_id"],
                     "segmentation": rle.encode(m), "iscrowd": 0, "area": float(m.sum())})  # fmt: skip
    return {"images": [], "annotations": anns, "categories": []}


def evaluate_masks(table: pa.Table, rows_masks, threshold: float) -> dict:
    gt = gt_json_from_table(table)
    pj = pseudo_json(rows_masks, threshold)
    pj["images"], pj["categories"] = gt["images"], gt["categories"]
    return pseudo_label_miou(gt, pj)


def evaluate_generator(
    model: nn.Module, table: pa.Table, images: str, size: int, enlarge: float = INFERENCE_ENLARGE,
    threshold: float = LabelConfig.threshold, device: str = "cpu", batch_size: int = LabelConfig.batch_size,
) -> dict:  # fmt: skip
    """mIoU (all / separated / by size) of ``model``'s pasted-back masks vs the table's GT."""
    rows = [r for r in table.to_pylist() if r.get("gt_segmentation")]
    rows.sort(key=lambda r: r["file_name"])
    return evaluate_masks(
        table, masks_for_rows(model, rows, images, size, enlarge, batch_size, device), threshold
    )
