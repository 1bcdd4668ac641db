"""The weakest pseudo masks of a run by quality score, streamed (issue 25): what the report's
"weakest masks" section draws, computed here because the report draws only.

:func:`weakest_masks` reads the mask parts (``exits.label.plan.MASK_SCHEMA``) column by column
in record batches: a bounded max-heap keeps the ``k`` lowest ``(score, ann_id)`` and a fixed
bin histogram of every score is summed batch by batch, so memory does not grow with the run.
Only the ``k`` chosen rows are then read whole (their RLE) and, where the instance table holds
a GT mask, scored against it (IoU). :func:`score_ranking` says how well scores rank masks by
their true IoU (Spearman, mean IoU of the top 90 % / 80 %; bench/quality.py).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from exits import manifest, storage
from exits.data import rle
from exits.data.coco import filter_table, parquet_dataset, scan_batches
from exits.data.crops import instance_box

WEAKEST = 24  # masks shown in the report's weakest-masks section
HISTOGRAM_BINS = 20  # equal bins over [0, 1]
WEAKEST_JSON = "weakest_masks.json"  # <run>/eval/weakest_masks.json
BATCH_ROWS = 65536  # (ann_id, score) rows per streamed batch
INSTANCE_COLUMNS = ["ann_id", "file_name", "height", "width", "bbox", "extreme_points",
                    "gt_segmentation"]  # fmt: skip


def lowest_scores(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int, bins: int = HISTOGRAM_BINS
) -> tuple[list[tuple[float, int]], np.ndarray, int]:
    """Stream ``(ann_ids (n,), scores (n,))`` batches: the ``k`` lowest ``(score, ann_id)``
    ascending (ties: lower ann_id first), the histogram (``bins`` counts over [0, 1], the last
    bin closed; scores outside [0, 1] are clipped into the end bins) and the number of rows
    without a finite score (left out of both). Memory: ``k`` pairs and ``bins`` counts."""
    heap: list[tuple[float, int]] = []  # max-heap of (-score, -ann_id): the k lowest kept
    counts = np.zeros(bins, np.int64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    no_score = 0
    for ids, scores in batches:
        scores = np.asarray(scores, np.float64)
        ok = np.isfinite(scores)
        no_score += int((~ok).sum())
        ids, scores = np.asarray(ids, np.int64)[ok], scores[ok]
        idx = np.searchsorted(edges, np.clip(scores, 0.0, 1.0), side="right") - 1
        counts += np.bincount(np.clip(idx, 0, bins - 1), minlength=bins)  # as np.histogram
        if len(scores) > k:  # only a batch's k lowest can enter the heap
            part = np.lexsort((ids, scores))[:k]
            ids, scores = ids[part], scores[part]
        for s, a in zip(scores.tolist(), ids.tolist()):
            item = (-s, -a)
            if len(heap) < k:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    low = sorted((-s, -a) for s, a in heap)
    return low, counts, no_score


def _score_batches(masks: ds.Dataset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in scan_batches(masks, ["ann_id", "score"], BATCH_ROWS):
        scores = batch["score"].to_numpy(zero_copy_only=False)  # nulls -> NaN
        yield batch["ann_id"].to_numpy(zero_copy_only=False), scores


def _rows_by_id(data: ds.Dataset | None, ids: list[int], columns: list[str]) -> dict[int, dict]:
    if data is None or not ids:
        return {}
    t = filter_table(data, columns, pc.field("ann_id").isin(pa.array(ids, pa.int64())))
    return {r["ann_id"]: r for r in t.to_pylist()}


def mask_iou(segmentation: str | None, gt_segmentation: str | None) -> float | None:
    """IoU of a pseudo mask and its GT mask (both RLE json); None without a GT mask."""
    if not gt_segmentation:
        return None
    gt = rle.from_json(gt_segmentation)
    if not segmentation:
        return 0.0
    return float(rle.iou(rle.from_json(segmentation), gt))


def weakest_masks(
    masks_uri: str, instances_uri: str | None = None, k: int = WEAKEST, bins: int = HISTOGRAM_BINS
) -> dict[str, Any]:
    """The ``k`` lowest-score masks of ``masks_uri`` (``<run>/label/masks``) and the score
    histogram, streamed; IoU against the instance table's GT mask where it has one.

    Returns:
        {"count" (masks with a score), "no_score", "bins" (bins + 1 edges), "histogram",
         "weakest": [{"ann_id", "image_id", "score", "area", "iou" (None without GT),
         "segmentation" (RLE json) and, from the instance table, "file_name", "height",
         "width", "box" [x0, y0, x1, y1], "extreme_points" ((4, 2) or None)}, ...] ascending
         by score}.
    """
    if k < 0 or bins < 1:
        raise ValueError(f"k must be >= 0 and bins >= 1, got k={k}, bins={bins}")
    masks = parquet_dataset(masks_uri)
    if masks is None:
        raise FileNotFoundError(f"no mask parts at {masks_uri} (label has not run)")
    low, counts, no_score = lowest_scores(_score_batches(masks), k, bins)
    ids = [a for _, a in low]
    rows = _rows_by_id(masks, ids, ["ann_id", "image_id", "segmentation", "area"])
    inst = _rows_by_id(
        parquet_dataset(instances_uri) if instances_uri else None, ids, INSTANCE_COLUMNS
    )
    weakest = []
    for score, a in low:
        row, src = rows[a], inst.get(a) or {}
        entry = {"ann_id": a, "image_id": row["image_id"], "score": score, "area": row["area"],
                 "iou": mask_iou(row["segmentation"], src.get("gt_segmentation")),
                 "segmentation": row["segmentation"]}  # fmt: skip
        if src:  # what the report draws: the image, the box and the four clicks
            box, _, _ = instance_box(
                src["extreme_points"], src["bbox"], src["height"], src["width"]
            )
            entry.update(file_name=src["file_name"], height=src["height"], width=src["width"],
                         box=None if box is None else [float(v) for v in box],
                         extreme_points=src["extreme_points"])  # fmt: skip
        weakest.append(entry)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {"count": int(counts.sum()), "no_score": no_score, "bins": edges.tolist(),
            "histogram": counts.tolist(), "weakest": weakest}  # fmt: skip


def top_fraction_miou(scores: np.ndarray, ious: np.ndarray, fraction: float) -> float:
    """Mean IoU of the ``ceil(fraction * n)`` highest-score masks (ties: earlier first); NaN
    when there are none. ``scores``, ``ious``: (n,) per mask."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = len(scores)
    keep = math.ceil(fraction * n - 1e-9)
    if keep == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:keep]
    return float(np.asarray(ious, np.float64)[order].mean())


def score_ranking(
    scores: np.ndarray, ious: np.ndarray, fractions: tuple[float, ...] = (0.9, 0.8)
) -> dict[str, float]:
    """How well scores rank masks by their true IoU: {"spearman" (rank correlation, ties
    averaged), "miou_all", "miou_top90", "miou_top80", ... per fraction}. ``scores``,
    ``ious``: (n,) per mask."""
    from scipy.stats import spearmanr

    s, v = np.asarray(scores, np.float64), np.asarray(ious, np.float64)
    if s.shape != v.shape:
        raise ValueError(f"scores {s.shape} and ious {v.shape} differ in shape")
    rho = float(spearmanr(s, v).statistic) if len(s) > 1 else float("nan")
    out = {"spearman": rho, "miou_all": float(v.mean()) if len(v) else float("nan")}
    for f in fractions:
        out[f"miou_top{round(f * 100)}"] = top_fraction_miou(s, v, f)
    return out


def write_weakest_masks(run: str, k: int = WEAKEST) -> dict[str, Any]:
    """:func:`weakest_masks` of a run, saved as ``<run>/eval/weakest_masks.json`` (the report's
    input). Raises when the run has no mask parts."""
    out = weakest_masks(
        manifest.stage_uri(run, "label", "masks"),
        manifest.stage_uri(run, "prepare", "instances.parquet"),
        k,
    )
    storage.write_json(manifest.stage_uri(run, "eval", WEAKEST_JSON), out)
    return out


__all__ = ["WEAKEST", "WEAKEST_JSON", "lowest_scores", "mask_iou", "score_ranking",
           "top_fraction_miou", "weakest_masks", "write_weakest_masks"]  # fmt: skip
