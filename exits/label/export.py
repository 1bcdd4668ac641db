"""COCO json export of pseudo masks (stage 1c output -> stage 2 input, or any COCO tool).

``export_coco`` keeps the source dataset's ``images``, ``categories`` (and ``info`` /
``licenses`` when present) and writes one annotation per mask row, streaming (memory independent
of the number of masks; the Parquet mask shards stay the primary output)::

    {"id": ann_id, "image_id", "category_id", "segmentation": {"size": [h, w], "counts": str},
     "area": mask area, "bbox": [x, y, w, h] of the mask, "score", "iscrowd": 0,
     "supervision": "extreme_points" | "box", "generator": checkpoint id}
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow.compute as pc

from exits import storage
from exits.data import rle
from exits.data.coco import read_table
from exits.data.jsonstream import iter_members
from exits.data.validate import drop_unusable_images

EXPORT_BATCH = 4096  # mask rows turned into json text at a time


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


def _mask_files(masks_uri: str) -> list[str]:
    """Parquet shards of ``masks_uri`` (a file or a directory); none for a run that committed
    nothing (no instances: the export is an empty json, not an error)."""
    if storage.is_dir(masks_uri) or not storage.exists(masks_uri):
        return [f for f in storage.list_dir(masks_uri) if f.endswith(".parquet")]
    return [masks_uri]


def export_coco(
    masks_uri: str,
    source_annotations: str,
    out_uri: str,
    *,
    skip_empty: bool = True,
    min_score: float = 0.0,
) -> dict[str, int]:
    """Write a COCO json of the pseudo masks at ``out_uri``, streaming (published atomically).

    Memory does not grow with the number of masks: the source json is streamed for its images
    and categories (its annotations are skipped), then the annotations are written shard by
    shard (shards in name order, each sorted by ann_id).

    Args:
        masks_uri: mask Parquet file or shard directory (``<run>/label/masks``).
        source_annotations: URI of the dataset's original COCO json (images/categories kept).
        out_uri: where to write the json (local or s3).
        skip_empty: leave out masks with zero area (nothing for stage 2 to learn from).
        min_score: leave out (non-empty) masks whose quality score is below this
            (``label.min_score``; 0 = keep all); they stay in the Parquet shards.

    Returns:
        {"images", "categories", "annotations", "skipped_empty", "below_min_score"}.
    """
    storage.remove_stale_temps(out_uri)  # "<out>.tmp-*" of an interrupted export (kill -9)
    files = _mask_files(masks_uri)
    meta: dict[str, Any] = {}
    images: list[Any] = []  # image entries only (no annotations): memory ~ the image count
    for key, value in iter_members(source_annotations, arrays=("images", "annotations")):
        if key == "images":
            images.append(value)
        elif key in ("info", "licenses", "categories"):
            meta[key] = value
    kept = {"images": images}
    drop_unusable_images(kept)  # entries that cannot be images (bad id/size/name): not exported
    images = kept["images"]
    image_ids = [int(i["id"]) for i in images]
    counts = {"images": len(images), "categories": 0, "annotations": 0, "skipped_empty": 0,
              "below_min_score": 0}  # fmt: skip
    with storage.publish_stream(out_uri) as out:
        out.write(b'{"images": [')
        for k in range(0, len(images), EXPORT_BATCH):
            text = ", ".join(json.dumps(i) for i in images[k : k + EXPORT_BATCH])
            out.write(b", " * bool(k) + text.encode())
        del images, kept
        meta.setdefault("categories", [])
        counts["categories"] = len(meta["categories"])
        out.write(b"], ")
        for key, value in meta.items():
            out.write(json.dumps(key).encode() + b": " + json.dumps(value).encode() + b", ")
        out.write(b'"annotations": [')
        known = np.unique(np.asarray(image_ids, dtype=np.int64))
        for uri in files:
            table = read_table(uri).sort_by("ann_id")
            if skip_empty:
                empty = pc.equal(table["area"], 0).fill_null(True)
                counts["skipped_empty"] += int(pc.sum(empty).as_py() or 0)
                table = table.filter(pc.invert(empty))
            if min_score > 0:  # a null score counts as below
                low = pc.less(table["score"], min_score).fill_null(True)
                counts["below_min_score"] += int(pc.sum(low).as_py() or 0)
                table = table.filter(pc.invert(low))
            unknown = ~np.isin(table["image_id"].to_numpy(), known)
            if unknown.any():
                row = table.slice(int(np.argmax(unknown)), 1).to_pylist()[0]
                raise ValueError(
                    f"mask row {row['ann_id']} refers to image {row['image_id']} absent from {source_annotations}"
                )
            for batch in table.to_batches(EXPORT_BATCH):
                text = ", ".join(json.dumps(annotation_from_row(r)) for r in batch.to_pylist())
                if text:
                    out.write(b", " * bool(counts["annotations"]) + text.encode())
                    counts["annotations"] += batch.num_rows
        out.write(b"]}")
    return counts
