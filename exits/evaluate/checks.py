"""Checks on what ``python -m exits.evaluate`` is given: predictions that cannot be scored are
left out *and counted* (never scored silently as something else, never a crash inside
pycocotools), GT annotations without a usable mask are skipped and counted.

A detection is left out when its image id or category id is not in the GT json, its score is
not a finite number, or (for ``segm``) it has no segmentation (a box-only prediction is not
scored as a mask) or a segmentation that does not fit its image (wrong RLE size, malformed
counts, polygon outside the image: :mod:`exits.data.validate`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pycocotools import mask as mask_utils

from exits.data.validate import check_segmentation, crowd_flag

logger = logging.getLogger(__name__)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def detection_problem(det: Mapping[str, Any], images: Mapping[int, Mapping], cats: set, iou_type: str) -> str | None:  # fmt: skip
    """Why one detection cannot be scored for ``iou_type`` (None when it can)."""
    img = images.get(det.get("image_id"))
    if img is None:
        return "unknown image id"
    if det.get("category_id") not in cats:
        return "unknown category id"
    if not _finite(det.get("score")):
        return "score is not a finite number"
    segm = det.get("segmentation")
    if iou_type == "segm" and segm is None:
        return "no segmentation (box-only prediction) in segm evaluation"
    if segm is not None:
        try:
            if check_segmentation(segm, int(img["height"]), int(img["width"])) is None:
                return "empty segmentation"
        except ValueError:
            return "segmentation does not fit its image (size or counts)"
    if iou_type == "bbox" and segm is None:
        box = det.get("bbox")
        if not (isinstance(box, list | tuple) and len(box) == 4 and all(map(_finite, box))):
            return "no valid bbox"
    return None


def usable_detections(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], iou_type: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(the detections that can be scored, {reason: count} of those left out; logged)."""
    images = {i.get("id"): i for i in gt.get("images", []) if isinstance(i, Mapping)}
    cats = {c.get("id") for c in gt.get("categories", []) if isinstance(c, Mapping)}
    keep, skipped = [], Counter()
    for det in results:
        reason = detection_problem(det, images, cats, iou_type)
        if reason:
            skipped[reason] += 1
        else:
            keep.append(dict(det))
    if skipped:
        logger.warning("%s: %d of %d predictions left out: %s", iou_type, sum(skipped.values()),
                       len(results), dict(skipped))  # fmt: skip
    return keep, dict(skipped)


def gt_crowd(ann: Mapping[str, Any]) -> bool:
    """Whether a GT annotation is crowd (skipped by the mIoU, ignored by COCOeval), by prepare's
    rule (:func:`exits.data.validate.crowd_flag`): JSON true/false or 0/1, absent = not crowd.
    Any other value (the string ``"0"``, null, 2) is a ``ValueError`` naming the annotation id:
    ``"0"`` is truthy in Python and would silently drop the instance as crowd."""
    try:
        return crowd_flag(ann.get("iscrowd", 0))
    except ValueError as e:
        raise ValueError(f"GT annotation id {str(ann.get('id'))[:40]!r}: {e}") from None


def gt_rle(ann: Mapping[str, Any], img: Mapping[str, Any] | None) -> dict | None:
    """Compressed RLE of a GT annotation, or None when it has no usable mask (box-only,
    unknown image, a segmentation that does not fit the image)."""
    if img is None or ann.get("segmentation") is None:
        return None
    try:
        h, w = int(img["height"]), int(img["width"])
        segm = check_segmentation(ann["segmentation"], h, w)
    except (ValueError, TypeError, KeyError):
        return None
    if segm is None:
        return None
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)
    counts = segm["counts"]
    return {
        "size": segm["size"],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def gt_with_masks(gt: Mapping[str, Any]) -> tuple[Mapping[str, Any], int]:
    """(the GT json for segm evaluation, how many annotations it leaves out): annotations
    without a usable mask (box-only, or a mask that does not fit its image) would crash
    COCOeval, so they are left out of segm (and counted); the input is not modified."""
    images = {i.get("id"): i for i in gt.get("images", []) if isinstance(i, Mapping)}
    anns = gt.get("annotations", [])
    keep = [a for a in anns if isinstance(a, Mapping) and gt_rle(a, images.get(a.get("image_id")))]
    if len(keep) == len(anns):
        return gt, 0
    logger.warning("segm: %d GT annotations without a usable mask left out", len(anns) - len(keep))
    return {**gt, "annotations": keep}, len(anns) - len(keep)
