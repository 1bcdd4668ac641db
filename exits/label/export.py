"""COCO json export of pseudo masks (stage 1c output -> stage 2 input, or any COCO tool).

``export_coco`` keeps the source dataset's ``images``, ``categories`` (and ``info`` /
``licenses`` when present) and writes one annotation per mask row::

    {"id": ann_id, "image_id", "category_id", "segmentation": {"size": [h, w], "counts": str},
     "area": mask area, "bbox": [x, y, w, h] of the mask, "score", "iscrowd": 0,
     "supervision": "extreme_points" | "box", "generator": checkpoint id}
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from exits import storage
from exits.data import rle
from exits.data.coco import read_table
from exits.data.validate import drop_unusable_images, id_or_none
from exits.label.plan import MASK_SCHEMA


def read_mask_rows(masks_uri: str) -> pa.Table:
    """Mask rows from a Parquet file or a directory of shards (``<run>/label/masks``)."""
    if storage.is_dir(masks_uri) or not storage.exists(masks_uri):
        # no directory: a run with no instances (nothing to commit) exports an empty json
        files = [f for f in storage.list_dir(masks_uri) if f.endswith(".parquet")]
        if not files:
            return MASK_SCHEMA.empty_table()
        return pa.concat_tables([read_table(f) for f in files])
    return read_table(masks_uri)


def annotation_from_row(row: dict) -> dict[str, Any]:
    """One mask row (exits.label.plan.MASK_SCHEMA) -> a COCO annotation dict (bbox from the mask)."""
    segm = rle.from_json(row["segmentation"])
    return {
        "id": int(row["ann_id"]),
        "image_id": int(row["image_id"]),
        "category_id": int(row["category_id"]),
        "segmentation": segm,
        "area": float(rle.area(segm)),
        "bbox": rle.bbox(segm),
        "score": float(row["score"]),
        "iscrowd": 0,
        "supervision": row["supervision"],
        "generator": row["generator"],
    }


def export_coco(
    masks_uri: str, source_annotations: str, out_uri: str, *, skip_empty: bool = True
) -> dict[str, int]:
    """Write a COCO json of the pseudo masks at ``out_uri`` (published atomically).

    Args:
        masks_uri: mask Parquet file or shard directory (``<run>/label/masks``).
        source_annotations: URI of the dataset's original COCO json (images/categories kept).
        out_uri: where to write the json (local or s3).
        skip_empty: leave out masks with zero area (nothing for stage 2 to learn from).

    Returns:
        {"images", "categories", "annotations", "skipped_empty"}.
    """
    source = storage.read_json(source_annotations)
    known_images = {
        id_or_none(i.get("id")) for i in source.get("images", []) if isinstance(i, dict)
    }
    rows = read_mask_rows(masks_uri).sort_by("ann_id").to_pylist()
    annotations, skipped = [], 0
    for row in rows:
        if skip_empty and not row["area"]:
            skipped += 1
            continue
        if int(row["image_id"]) not in known_images:
            raise ValueError(
                f"mask row {row['ann_id']} refers to image {row['image_id']} absent from {source_annotations}"
            )
        annotations.append(annotation_from_row(row))
    out = {k: source[k] for k in ("info", "licenses") if k in source}
    drop_unusable_images(source)  # entries that cannot be images (bad id/size/name): not exported
    out.update(
        images=source.get("images", []),
        categories=source.get("categories", []),
        annotations=annotations,
    )
    storage.publish_bytes(out_uri, json.dumps(out).encode("utf-8"))
    return {
        "images": len(out["images"]),
        "categories": len(out["categories"]),
        "annotations": len(annotations),
        "skipped_empty": skipped,
    }
