"""Generator inference on instance crops: the ONE crop -> logits -> full-resolution mask path.

``predict_logits`` (batched torch; what the labeller's Ray actors call) maps uint8 crops to
logits at the generator's resolution; ``paste_probs`` / ``mask_from_logits`` turn one crop's
logits into a full-resolution probability / thresholded mask (sigmoid, bilinear paste, zero
outside the box), used by the labeller (``exits.label.stages.paste_masks``) and by
``masks_for_rows``, the numpy convenience loop behind the stage-1b held-out metric.

Quality score (issue 25): every mask gets a score in [0, 1] from the same pasted probability,
no second pass: ``mask_score`` = ``expected_iou`` (soft IoU of the box's probabilities with
their own thresholded mask). The other candidates (``mask_confidence``: mean probability inside
the mask; ``click_agreement``: the mask against its own four extreme points; ``box_margin``: how
far from undecided the probabilities in the box are; click x margin; ``mask_fill``,
``mask_parts``, ``mask_reach``: the mask's shape in its box) ranked masks worse on the
coco_mini tune split, alone, multiplied with expected IoU, or in a fitted linear combination
(docs/benchmarks.md); ``score_candidates`` computes all of them so bench/quality.py can
re-measure the choice on another generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from scipy.special import expit
from torch import nn

from exits.config import LabelConfig
from exits.data.crops import INFERENCE_ENLARGE, crop_and_resize, enlarge_box, paste_mask, row_box
from exits.data.images import load_image_under
from exits.data.transforms import normalize, to_tensor


@torch.inference_mode()
def predict_logits(
    model: nn.Module, crops: torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Batched torch call: (B, S, S, 3) uint8 crops (any device) -> (B, h, h) float32 logits on
    ``device`` (h = S / 4). bf16 autocast on CUDA, float32 on CPU."""
    device = torch.device(device)
    x = normalize(to_tensor(crops.to(device, non_blocking=True)))  # (B, 3, S, S)
    with torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    ):
        logits = model(x)  # (B, 1, h, h)
    return logits[:, 0].float()


def predict_probs(
    model: nn.Module, crops: np.ndarray, device: torch.device | str = "cpu"
) -> np.ndarray:
    """numpy convenience: (B, S, S, 3) uint8 crops -> (B, h, h) float32 probabilities."""
    crops_t = torch.from_numpy(np.ascontiguousarray(crops))
    return predict_logits(model, crops_t, device).sigmoid().cpu().numpy()


def paste_probs(
    logits: np.ndarray, box: np.ndarray, crop_box: np.ndarray, image_hw: tuple[int, int]
) -> np.ndarray:
    """(h, w) crop-space logits -> (H, W) float32 probabilities, 0 outside ``box``.

    Sigmoid, then bilinear paste through the inverse crop map (``crops.paste_mask``).
    """
    prob = expit(logits.astype(np.float32))  # (h, w); no overflow warning for large −logits
    return paste_mask(prob, crop_box, image_hw, box=box)  # (H, W)


CLICK_TOLERANCE = 1  # px: a click counts as inside the mask when a mask pixel is this close


def box_pixels(box: np.ndarray, image_hw: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, cols) slices of the pixels whose centres lie inside ``box`` [x0, y0, x1, y1]
    (edge coords; the ``paste_mask`` rule), clipped to the (H, W) image."""
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, c1 = max(math.ceil(x0 - 0.5), 0), min(math.ceil(x1 - 0.5), w)
    r0, r1 = max(math.ceil(y0 - 0.5), 0), min(math.ceil(y1 - 0.5), h)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def box_margin(prob: np.ndarray) -> float:
    """Mean decisiveness of the probabilities inside the box: mean over pixels of |2p - 1|.

    ``prob``: (h, w) probabilities of the box's pixels. 1 when every pixel is 0 or 1, 0 when
    every pixel is 0.5; 0 for an empty box.
    """
    if prob.size == 0:
        return 0.0
    return float(np.abs(2.0 * prob.astype(np.float64) - 1.0).mean())


def click_agreement(
    mask: np.ndarray, points: np.ndarray, tolerance: int = CLICK_TOLERANCE
) -> float:
    """How well a mask agrees with its own extreme points (the four clicks), in [0, 1].

    Args:
        mask: (h, w) bool mask of the box's pixels.
        points: (4, 2) extreme points (x, y) top, left, bottom, right in the same pixel frame.
        tolerance: a click is inside when a mask pixel lies within this Chebyshev distance.

    Per click: inside (0/1) and extreme = 1 - |the mask's extreme coordinate on that side -
    the click's| / the box side along that axis (top/bottom: the mask's first/last row vs the
    click's y over h; left/right: first/last column vs x over w; floored at 0). The score is
    the mean over the four clicks of (inside + extreme) / 2: 1 when the mask covers every
    click and its extremes sit exactly at them; 0 for an empty mask.
    """
    if not mask.any():
        return 0.0
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    pts = np.asarray(points, dtype=np.float64).reshape(4, 2)
    extremes = (rows[0], cols[0], rows[-1], cols[-1])  # top, left, bottom, right
    terms = []
    for k, (x, y) in enumerate(pts):
        xi, yi = int(round(x)), int(round(y))
        win = mask[max(yi - tolerance, 0) : max(yi + tolerance + 1, 0),
                   max(xi - tolerance, 0) : max(xi + tolerance + 1, 0)]  # fmt: skip
        inside = float(win.any())
        coord, side = (y, h) if k % 2 == 0 else (x, w)
        extreme = max(0.0, 1.0 - abs(float(extremes[k]) - coord) / side)
        terms.append((inside + extreme) / 2)
    return float(np.mean(terms))


def mask_confidence(prob: np.ndarray, mask: np.ndarray) -> float:
    """Mean probability inside the mask: (h, w) probabilities and their thresholded (h, w)
    mask -> a value in [threshold, 1]; 0 for an empty mask."""
    return float(prob[mask].astype(np.float64).mean()) if mask.any() else 0.0


def expected_iou(prob: np.ndarray, mask: np.ndarray) -> float:
    """Soft IoU of the probabilities with their own thresholded mask, an estimate of the mask's
    IoU if each pixel were foreground with its probability: sum(p * m) / (sum(m) + sum(p) -
    sum(p * m)) over (h, w) ``prob`` / ``mask``; in [0, 1], 0 for an empty mask."""
    if not mask.any():
        return 0.0
    p = prob.astype(np.float64)
    inter = float(p[mask].sum())
    return inter / (float(mask.sum()) + float(p.sum()) - inter)


def mask_fill(mask: np.ndarray) -> float:
    """How much of its box the mask fills: (h, w) bool mask of the box's pixels -> mask pixels /
    box pixels in [0, 1]; 0 for an empty box."""
    return float(mask.mean()) if mask.size else 0.0


def mask_parts(mask: np.ndarray) -> float:
    """1 / the number of 8-connected components of the (h, w) bool mask: 1 for one piece, 1/k
    for k pieces, 0 for an empty mask."""
    if not mask.any():
        return 0.0
    n, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return 1.0 / (n - 1)  # label 0 is the background


def mask_reach(mask: np.ndarray) -> float:
    """How far the mask reaches to its box's four sides: the area of the mask's own bounding
    box over the box's, (h, w) bool mask of the box's pixels -> [0, 1] (1 when the mask touches
    every side, as a whole object does its tight box); 0 for an empty mask."""
    if not mask.any():
        return 0.0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)) / mask.size


def score_candidates(
    prob: np.ndarray, mask: np.ndarray, points: np.ndarray | None
) -> dict[str, float]:
    """Every quality-score candidate measured for issue 25 (bench/quality.py reports each one's
    Spearman with IoU): ``expected_iou`` (shipped), ``confidence``, ``margin``, ``click``,
    ``click_x_margin``, ``fill`` (mask / box pixels), ``parts`` (1 / components) and ``reach``
    (the mask's bounding box / the box).

    ``prob`` / ``mask``: (h, w) probabilities / thresholded mask of the box's pixels;
    ``points``: (4, 2) extreme points in that frame, or None / NaN (box-only supervision: the
    box's side midpoints stand in for the clicks).
    """
    if points is None or not np.all(np.isfinite(points)):
        h, w = mask.shape
        points = np.array(
            [[(w - 1) / 2, 0], [0, (h - 1) / 2], [(w - 1) / 2, h - 1], [w - 1, (h - 1) / 2]]
        )
    click, margin = click_agreement(mask, points), box_margin(prob)
    return {"expected_iou": expected_iou(prob, mask), "confidence": mask_confidence(prob, mask),
            "margin": margin, "click": click, "click_x_margin": click * margin,
            "fill": mask_fill(mask), "parts": mask_parts(mask),
            "reach": mask_reach(mask)}  # fmt: skip


def mask_score(prob: np.ndarray, mask: np.ndarray, points: np.ndarray | None = None) -> float:
    """The per-mask quality score in [0, 1] (one per instance, from the labeller's own pass):
    ``expected_iou``, the candidate whose Spearman correlation with the true IoU was the
    highest on the coco_mini tune split (docs/benchmarks.md). ``prob`` / ``mask``: (h, w) of the
    box's pixels; ``points`` (the clicks) are used by other candidates only."""
    return expected_iou(prob, mask)


def mask_from_logits(
    logits: np.ndarray,
    box: np.ndarray,
    crop_box: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """(h, w) crop-space logits -> (H, W) bool mask confined to ``box`` and its quality score.

    Sigmoid, bilinear paste through the inverse crop map (zero outside the box), threshold.
    The score is ``mask_score`` over the box's pixels; ``points``: the instance's (4, 2)
    extreme points (x, y) in image pixels, None for box-only supervision.
    """
    full = paste_probs(logits, box, crop_box, image_hw)  # (H, W) float32, 0 outside the box
    return threshold_and_score(full, box, threshold, points)


def threshold_and_score(
    full: np.ndarray, box: np.ndarray, threshold: float, points: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """(H, W) pasted probabilities (0 outside ``box``) -> (H, W) bool mask and its
    ``mask_score`` over the box's pixels; ``points``: (4, 2) extreme points (x, y) in image
    pixels, None for box-only supervision. The labeller's and the benches' one scoring rule."""
    mask = full >= threshold
    rows, cols = box_pixels(box, full.shape[:2])
    local = None if points is None else np.asarray(points, np.float64) - [cols.start, rows.start]
    return mask, mask_score(full[rows, cols], mask[rows, cols], local)


def crop_instance(
    image: np.ndarray, row: dict, size: int, enlarge: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crop (S, S, 3) uint8, crop_box, box) at the fixed inference enlargement."""
    box, _ = row_box(row)
    crop_box = enlarge_box(box, enlarge)
    crop, _ = crop_and_resize(image, crop_box, size)
    return crop, crop_box, box


def masks_for_rows(
    model: nn.Module,
    rows: list[dict],
    images: str,
    size: int,
    enlarge: float = INFERENCE_ENLARGE,
    batch_size: int = LabelConfig.batch_size,
    device: str = "cpu",
) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield (row, full-resolution probability mask (H, W) float32, zero outside the box)."""
    cache: dict[str, np.ndarray] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        crops, geoms = [], []
        for row in chunk:
            if row["file_name"] not in cache:
                cache.clear()  # rows are grouped by image in practice; keep one image
                cache[row["file_name"]] = load_image_under(images, row["file_name"])
            crop, crop_box, box = crop_instance(cache[row["file_name"]], row, size, enlarge)
            crops.append(crop)
            geoms.append((crop_box, box))
        crops_t = torch.from_numpy(np.stack(crops))  # (B, S, S, 3) uint8
        logits = predict_logits(model, crops_t, device).cpu().numpy()  # (B, h, h)
        for row, lg, (crop_box, box) in zip(chunk, logits, geoms):
            yield row, paste_probs(lg, box, crop_box, (row["height"], row["width"]))
