"""Pseudo-label quality of a generator on held-out instances with GT masks (stage 1b metric),
scored chunk by chunk into :class:`~exits.evaluate.miou.MiouSums`."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from exits.config import LabelConfig
from exits.data import rle
from exits.data.crops import INFERENCE_ENLARGE
from exits.evaluate.miou import MiouSums
from exits.evaluate.streaming import BATCH_ROWS, gt_of
from exits.inference import masks_for_rows


def mask_sums(table: pa.Table, rows_masks, threshold: float) -> MiouSums:
    """IoU sums of thresholded (H, W) probability masks vs the GT of ``table``'s rows that
    carry one (rows without GT are not scored; their masks count as ``extra``)."""
    pseudo = {row["ann_id"]: {"image_id": row["image_id"], "segmentation": rle.encode(prob >= threshold)}
              for row, prob in rows_masks}  # fmt: skip
    sums, matched = MiouSums(), 0
    for batch in table.to_batches(BATCH_ROWS):
        for row in batch.to_pylist():
            if row.get("gt_segmentation"):
                gt, img = gt_of(row)
                p = pseudo.get(row["ann_id"])
                matched += sums.score(gt, img, p, row.get("separated")) and p is not None
    sums.extra = len(pseudo) - matched
    return sums


def evaluate_masks(table: pa.Table, rows_masks, threshold: float) -> dict:
    """mIoU (all / separated / by size) of ``(row, probability mask)`` pairs vs ``table``'s GT."""
    return mask_sums(table, rows_masks, threshold).summary()


def evaluate_generator(
    model: nn.Module, table: pa.Table, images: str, size: int, enlarge: float = INFERENCE_ENLARGE,
    threshold: float = LabelConfig.threshold, device: str = "cpu", batch_size: int = LabelConfig.batch_size,
) -> dict:  # fmt: skip
    """mIoU (all / separated / by size) of ``model``'s pasted-back masks vs the table's GT,
    :data:`BATCH_ROWS` rows at a time (sorted by image): memory holds one chunk's masks."""
    table = table.filter(pc.is_valid(table["gt_segmentation"]))
    table = table.take(pc.sort_indices(table, [("file_name", "ascending")]))
    sums = MiouSums()
    for start in range(0, table.num_rows, BATCH_ROWS):
        chunk = table.slice(start, BATCH_ROWS)
        masks = masks_for_rows(model, chunk.to_pylist(), images, size, enlarge, batch_size, device)
        sums.merge(mask_sums(chunk, masks, threshold))
    return sums.summary()
