"""Pseudo-label mIoU and the box-as-mask baseline streamed over Parquet parts: the driver
holds :class:`~exits.evaluate.miou.MiouSums`, never the instances.

The GT is the instance table (``exits.data.coco`` schema: ``gt_segmentation`` RLE json,
``area``, ``separated``), read in record batches of :data:`BATCH_ROWS` rows, columns needed
only. Each batch is joined by ``ann_id`` with the mask rows (``exits.label.plan.MASK_SCHEMA``)
of the mask parts whose image-id range overlaps the batch's part: prepare and label both shard
by images sorted by id (contiguous image-id ranges), so the pass reads each mask part about
once and holds one instance part's mask rows. The numbers are those of
:func:`exits.evaluate.metrics.pseudo_label_miou` on a GT json of the table's instances (rows without ``gt_segmentation`` count in
``no_gt_mask``) and the pseudo json that ``exits.label.export`` writes (empty masks left out, so
scored as ``missing``). A mask row is looked up under its instance's image id (the labeller
copies it from the instance table).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from exits import storage
from exits.data import rle
from exits.data.coco import parquet_dataset, scan_batches
from exits.data.crops import row_box
from exits.evaluate.miou import MiouSums, box_mask

BATCH_ROWS = 4096  # GT rows per join step
GT_COLUMNS = ("ann_id", "image_id", "height", "width", "area", "separated", "iscrowd", "gt_segmentation")  # fmt: skip
BOX_COLUMNS = (*GT_COLUMNS, "bbox", "extreme_points")
MASK_COLUMNS = ["ann_id", "image_id", "segmentation"]


def _batches(uri: str, columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    """Record batches (<= BATCH_ROWS rows, never across parts) of the instance table, one
    part at a time (:func:`exits.data.coco.scan_batches`)."""
    table = parquet_dataset(uri)
    if table is not None:
        yield from scan_batches(table, columns, BATCH_ROWS)


def gt_of(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(GT annotation dict, image dict) of an instance-table row, as the json path sees them."""
    segm = row.get("gt_segmentation")
    ann = {"id": row["ann_id"], "image_id": row["image_id"], "iscrowd": int(bool(row.get("iscrowd"))),
           "segmentation": rle.from_json(segm) if segm else None, "area": row["area"]}  # fmt: skip
    return ann, {"height": row["height"], "width": row["width"]}


def _pseudo(image_id: int, text: str | None) -> dict[str, Any]:
    """A mask row's pseudo annotation; unreadable RLE json becomes a mask that fits nothing."""
    try:
        segm = rle.from_json(text) if text else None
    except (ValueError, KeyError, TypeError):
        segm = None
    return {"image_id": image_id, "segmentation": segm}


class _MaskParts:
    """The mask parts with their image-id ranges (read once), for lookups by image-id range."""

    def __init__(self, masks_uri: str) -> None:
        self.fs, _ = storage.get_filesystem(masks_uri)
        self.parts: list[tuple[int, int, str]] = []
        self.nonempty = 0
        self.reads = 0  # mask parts opened by lookups (each about once: tested)
        masks = parquet_dataset(masks_uri)
        for fragment in masks.get_fragments() if masks is not None else ():
            t = fragment.to_table(columns=["image_id", "area"])
            if t.num_rows:
                lo, hi = pc.min_max(t["image_id"]).values()
                self.parts.append((lo.as_py(), hi.as_py(), fragment.path))
                self.nonempty += int(pc.sum(pc.greater(t["area"], 0)).as_py() or 0)

    def lookup(self, lo: int, hi: int) -> dict[int, dict[str, Any]]:
        """ann_id -> pseudo annotation of the non-empty mask rows with ``lo <= image_id <=
        hi``, from the parts whose range overlaps (one at a time, only matching rows kept)."""
        found: dict[int, dict[str, Any]] = {}
        flt = (pc.field("image_id") >= lo) & (pc.field("image_id") <= hi) & (pc.field("area") > 0)
        for a, b, path in self.parts:
            if a > hi or b < lo:
                continue
            self.reads += 1
            t = ds.dataset(path, filesystem=self.fs, format="parquet").to_table(
                MASK_COLUMNS, filter=flt
            )
            ids, images, segms = (t[c].to_pylist() for c in MASK_COLUMNS)
            found.update((a, _pseudo(i, s)) for a, i, s in zip(ids, images, segms))
        return found


def table_pseudo_label_miou(masks_uri: str, instances_uri: str) -> dict[str, Any]:
    """Pseudo-label mIoU (all / separated / by size) of the mask parts at ``masks_uri``
    (``<run>/label/masks``) against the GT in the instance table at ``instances_uri``, in
    :func:`exits.evaluate.metrics.pseudo_label_miou`'s format.

    One pass: per instance-table part (prepare's image shard: a contiguous image-id range),
    the mask rows of that range are read once from the mask parts that overlap it (label's
    shards: contiguous ranges too), then the part's GT rows are scored batch by batch. Memory:
    one instance part's mask rows and one GT batch, whatever the table's size."""
    masks = _MaskParts(masks_uri)
    sums, matched = MiouSums(), 0
    table = parquet_dataset(instances_uri)
    have = [c for c in GT_COLUMNS if table is not None and c in table.schema.names]
    for fragment in table.get_fragments() if table is not None else ():
        image_ids = fragment.to_table(columns=["image_id"])["image_id"]
        if len(image_ids) == 0:
            continue
        lo, hi = (v.as_py() for v in pc.min_max(image_ids).values())
        found = masks.lookup(lo, hi)
        for batch in scan_batches(fragment, have, BATCH_ROWS):
            for row in batch.to_pylist():
                gt, img = gt_of(row)
                pseudo = found.get(row["ann_id"])
                matched += sums.score(gt, img, pseudo, row.get("separated")) and pseudo is not None
    sums.extra = masks.nonempty - matched  # mask rows whose instance was not scored
    return sums.summary()


def box_pseudo(row: dict[str, Any]) -> dict[str, Any] | None:
    """The box-as-mask pseudo annotation of an instance row (the labeller's crop box:
    :func:`exits.data.crops.row_box`), None for a row without a valid box."""
    try:
        box, _ = row_box(row)
    except ValueError:
        return None
    return {"image_id": row["image_id"],
            "segmentation": rle.encode(box_mask(box, row["height"], row["width"]))}  # fmt: skip


def table_box_baseline_miou(instances_uri: str) -> dict[str, Any]:
    """mIoU of each instance's box as its mask vs its GT mask, streamed over the instance table
    (:func:`exits.evaluate.metrics.box_baseline_miou`'s numbers on the same instances)."""
    sums = MiouSums()
    for batch in _batches(instances_uri, BOX_COLUMNS):
        for row in batch.to_pylist():
            gt, img = gt_of(row)
            pseudo = box_pseudo(row)
            if not sums.score(gt, img, pseudo, row.get("separated")) and pseudo is not None:
                sums.extra += 1
    return sums.summary()
