"""Pseudo-label mIoU as sums: the per-instance scoring rule and an accumulator that holds sums
and counts, never instances.

Both mIoU paths use it, so they give the same numbers: the json path
(:func:`exits.evaluate.metrics.pseudo_label_miou`, one COCO json against another) and the
streamed Parquet path (:mod:`exits.evaluate.streaming`, part by part). Means are taken from
exact (correctly rounded) sums, so the result does not depend on the order of the parts.

Conventions (paper Table 4 and COCO):
* mIoU = mean over GT instances (non-crowd, non-empty) of IoU(pseudo mask, GT mask); a GT
  instance without a pseudo label scores 0 (``missing``).
* Separated: GT masks with >= 2 connected components at 8-connectivity.
* Size buckets on the GT ``area``: small < 32², 32² <= medium < 96², large >= 96² (half-open).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from exits.data import rle
from exits.evaluate.checks import gt_crowd
from exits.evaluate.checks import gt_rle as gt_rle_of

SMALL_AREA = 32**2  # COCO small/medium boundary, pixels
MEDIUM_AREA = 96**2  # COCO medium/large boundary, pixels
SEPARATED_MIN_COMPONENTS = 2  # paper Table 4: >= 2 connected components
CONNECTIVITY = 8
GROUPS = ("all", "separated", "small", "medium", "large")


def num_components(mask: np.ndarray) -> int:
    """Connected foreground components of a binary mask (H, W), 8-connectivity."""
    n_labels, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=CONNECTIVITY)
    return int(n_labels) - 1  # label 0 is background


def is_separated(mask: np.ndarray) -> bool:
    """Paper's "separated" instance: GT mask (H, W) with >= 2 connected components."""
    return num_components(mask) >= SEPARATED_MIN_COMPONENTS


def size_bucket(area: float) -> str:
    """COCO size bucket of an instance area in pixels: small / medium / large (half-open)."""
    if area < SMALL_AREA:
        return "small"
    return "medium" if area < MEDIUM_AREA else "large"


def rle_iou(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """IoU of two compressed RLEs of the same size (non-crowd)."""
    return rle.iou(a, b)


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """Binary (H, W) mask of a box ``[x0, y0, x1, y1]`` in pixel edges (rounded, clipped)."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    m = np.zeros((height, width), np.uint8)
    m[max(y0, 0) : max(min(y1, height), 0), max(x0, 0) : max(min(x1, width), 0)] = 1
    return m


@dataclass
class ExactSum:
    """A float sum kept exactly (Shewchuk's non-overlapping partials, as ``math.fsum``): the
    value is the correctly rounded sum of everything added, whatever the order."""

    partials: list[float] = field(default_factory=list)

    def add(self, x: float) -> None:
        kept = []
        for y in self.partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                kept.append(lo)
            x = hi
        self.partials = [*kept, x]

    def value(self) -> float:
        return math.fsum(self.partials)


@dataclass
class MiouSums:
    """IoU sums and counts per group (:data:`GROUPS`) plus the bookkeeping counts of
    :func:`exits.evaluate.metrics.pseudo_label_miou`; ``merge`` adds another part's sums."""

    sums: dict[str, ExactSum] = field(default_factory=lambda: {g: ExactSum() for g in GROUPS})
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    missing: int = 0
    extra: int = 0
    no_gt_mask: int = 0
    invalid_pseudo: int = 0

    def add(self, iou: float, area: float, separated: bool) -> None:
        """One evaluated instance: its IoU into "all", its size bucket and maybe "separated"."""
        for group in ("all", size_bucket(area), *(("separated",) if separated else ())):
            self.sums[group].add(iou)
            self.counts[group] += 1

    def score(
        self,
        gt_ann: Mapping[str, Any],
        img: Mapping[str, Any] | None,
        pseudo_ann: Mapping[str, Any] | None,
        separated: bool | None = None,
    ) -> bool:
        """Score one GT annotation against its pseudo annotation (None: missing, IoU 0).

        Crowd (:func:`exits.evaluate.checks.gt_crowd`: boolean or 0/1, else a ``ValueError``
        naming the annotation) and empty GT are skipped; GT without a usable mask is counted in ``no_gt_mask``;
        a pseudo mask that does not fit the GT image (or names another image) scores 0 and is
        counted in ``invalid_pseudo``. ``separated``: the GT mask's flag when known (the
        instance table's column), else computed from the mask. Returns whether it was scored.
        """
        if gt_crowd(gt_ann):
            return False
        gt_rle = gt_rle_of(gt_ann, img)
        if gt_rle is None:
            self.no_gt_mask += 1
            return False
        if rle.area(gt_rle) == 0:
            return False
        if pseudo_ann is not None:
            same_image = pseudo_ann.get("image_id") == gt_ann.get("image_id")
            pseudo_rle = gt_rle_of(pseudo_ann, img) if same_image else None
            iou = rle_iou(pseudo_rle, gt_rle) if pseudo_rle is not None else 0.0
            self.invalid_pseudo += pseudo_rle is None
        else:
            iou, self.missing = 0.0, self.missing + 1
        if separated is None:
            separated = is_separated(rle.decode(gt_rle))
        self.add(iou, gt_ann.get("area", rle.area(gt_rle)), bool(separated))
        return True

    def merge(self, other: MiouSums) -> MiouSums:
        for g in GROUPS:
            for x in other.sums[g].partials:
                self.sums[g].add(x)
            self.counts[g] += other.counts[g]
        for name in ("missing", "extra", "no_gt_mask", "invalid_pseudo"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def summary(self) -> dict[str, Any]:
        """``{"all": {"miou", "count"}, "separated", "small", "medium", "large", "missing",
        "extra", "no_gt_mask", "invalid_pseudo"}`` (miou NaN for an empty group)."""
        out: dict[str, Any] = {
            g: {"miou": self.sums[g].value() / n if (n := self.counts[g]) else math.nan, "count": n}
            for g in GROUPS
        }
        out["missing"], out["extra"] = self.missing, self.extra
        out["no_gt_mask"], out["invalid_pseudo"] = self.no_gt_mask, self.invalid_pseudo
        return out
