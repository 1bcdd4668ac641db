"""Crop geometry: boxes from extreme points, enlargement, crop+resize, inverse map, paste-back.

Conventions (docs/architecture.md): images H x W x 3 uint8 RGB; boxes ``[x0, y0, x1, y1]`` float in pixel
*edge* coordinates (pixel ``i`` spans ``[i, i+1)``, so x1/y1 are exclusive); points (x, y) are
pixel indices (centres at ``i + 0.5`` in edge coordinates).

A crop box maps linearly onto an S x S crop: crop pixel ``u`` covers image x in
``[x0 + u*sx, x0 + (u+1)*sx)`` with ``sx = (x1 - x0) / S``. Area of the crop box outside the image
is padding (``valid = False``), not background evidence.
"""

from __future__ import annotations

import cv2
import numpy as np

from exits.config import CropConfig
from exits.data.extreme_points import box_from_extreme_points, validate_extreme_points

# Defined once, in CropConfig (MAL): a fixed 1.3x per dimension at inference; at training a
# random margin per side, 1.3x per dimension on average and at most 1.6x.
INFERENCE_ENLARGE = CropConfig.inference_enlarge
TRAIN_MEAN_ENLARGE = CropConfig.train_mean_enlarge
TRAIN_MAX_ENLARGE = CropConfig.train_max_enlarge

__all__ = [
    "box_from_extreme_points",
    "instance_box",
    "row_box",
    "enlarge_box",
    "random_enlarge_box",
    "crop_and_resize",
    "image_to_crop",
    "crop_to_image",
    "box_mask_in_crop",
    "paste_mask",
]


def instance_box(
    points: list | np.ndarray | None, bbox: list[float] | None, height: int, width: int
) -> tuple[np.ndarray | None, str, str | None]:
    """Box ``[x0, y0, x1, y1]`` (edge coords) of one instance, its supervision, or a reason.

    Extreme points (4, 2) when present (validated) give the box and supervision
    "extreme_points"; otherwise the COCO xywh ``bbox`` (validated) with supervision "box".
    Returns (box or None, supervision, reason or None).
    """
    if points is not None:
        p = np.asarray(points, dtype=np.float64)
        reason = validate_extreme_points(p, height, width)
        if reason:
            return None, "extreme_points", f"degenerate extreme points: {reason}"
        return box_from_extreme_points(p), "extreme_points", None
    b = np.asarray(bbox if bbox is not None else [np.nan] * 4, dtype=np.float64)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        return None, "box", "no extreme points, no mask and no valid bbox"
    if b[2] < 2 or b[3] < 2:  # as for extreme points: a box must span >= 2 px each way
        return None, "box", f"degenerate box {b.tolist()}"
    if b[0] < 0 or b[1] < 0 or b[0] + b[2] > width + 0.5 or b[1] + b[3] > height + 0.5:
        return None, "box", f"box {b.tolist()} outside the image {width}x{height}"
    return np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]]), "box", None


def row_box(row: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(box [x0, y0, x1, y1] in pixel edges, extreme points (4, 2) or None for box-only rows)
    of one instance-table row.

    Raises ValueError for rows ``instance_box`` rejects (the prepare stage already turned
    those into error rows).
    """
    pts = row.get("extreme_points")
    box, _, reason = instance_box(pts, row.get("bbox"), row["height"], row["width"])
    if reason:
        raise ValueError(f"instance {row.get('ann_id')}: {reason}")
    return box, (np.asarray(pts, dtype=np.float64) if pts is not None else None)


def enlarge_box(box: np.ndarray, factor: float = INFERENCE_ENLARGE) -> np.ndarray:
    """Scale (..., 4) boxes about their centre by ``factor`` per dimension."""
    b = np.asarray(box, dtype=np.float64)
    cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2
    hw, hh = (b[..., 2] - b[..., 0]) * factor / 2, (b[..., 3] - b[..., 1]) * factor / 2
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=-1)


def random_enlarge_box(
    box: np.ndarray,
    rng: np.random.Generator,
    mean_factor: float = TRAIN_MEAN_ENLARGE,
    max_factor: float = TRAIN_MAX_ENLARGE,
) -> np.ndarray:
    """MAL's training enlargement: an independent random margin on each side.

    Each side gets a margin ``U(0, max_factor - 1) / 2`` of the box size, so a dimension grows by
    ``1 + m_a + m_b``: on average ``mean_factor`` (when ``max_factor - 1 == 2 (mean_factor - 1)``,
    the defaults) and at most ``max_factor``.
    """
    if max_factor < 1 or mean_factor < 1 or mean_factor > max_factor:
        raise ValueError(f"bad enlargement: mean {mean_factor}, max {max_factor}")
    b = np.asarray(box, dtype=np.float64)
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    # mean margin per side (mean_factor - 1) / 2, uniform on [0, 2 * that], capped by max_factor
    hi = min(mean_factor - 1.0, (max_factor - 1.0) / 2)
    m = rng.uniform(0.0, hi, size=b.shape[:-1] + (4,))
    return np.stack(
        [
            b[..., 0] - m[..., 0] * w,
            b[..., 1] - m[..., 1] * h,
            b[..., 2] + m[..., 2] * w,
            b[..., 3] + m[..., 3] * h,
        ],
        axis=-1,
    )


def _affine_image_to_crop(crop_box: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine mapping image pixel-index coords to crop pixel-index coords."""
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    sx, sy = size / (x1 - x0), size / (y1 - y0)
    # u = (x + 0.5 - x0) * sx - 0.5
    return np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]])


def image_to_crop(points: np.ndarray, crop_box: np.ndarray, size: int) -> np.ndarray:
    """Map (..., 2) image pixel coordinates (x, y) into an S x S crop's pixel coordinates."""
    a = _affine_image_to_crop(crop_box, size)
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[..., 0] * a[0, 0] + a[0, 2], p[..., 1] * a[1, 1] + a[1, 2]], axis=-1)


def crop_to_image(points: np.ndarray, crop_box: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`image_to_crop`."""
    a = _affine_image_to_crop(crop_box, size)
    p = np.asarray(points, dtype=np.float64)
    return np.stack([(p[..., 0] - a[0, 2]) / a[0, 0], (p[..., 1] - a[1, 2]) / a[1, 1]], axis=-1)


def _valid_mask(crop_box: np.ndarray, size: int, height: int, width: int) -> np.ndarray:
    """(S, S) bool: crop pixels whose centre lies inside the image."""
    centres = np.arange(size) + 0.5
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    xs = x0 + centres * (x1 - x0) / size
    ys = y0 + centres * (y1 - y0) / size
    return ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]


def crop_and_resize(
    image: np.ndarray, crop_box: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``crop_box`` out of ``image`` (zero padding outside) and resize to ``size x size``.

    Args:
        image: (H, W, 3) uint8 RGB (or (H, W) single channel).
        crop_box: [x0, y0, x1, y1] in pixel edge coordinates; may extend past the image.
        size: output side S (aspect ratio is not kept, as in the paper).

    Returns:
        crop (S, S, 3) uint8 and valid (S, S) bool (crop pixel inside the image).
    """
    a = _affine_image_to_crop(np.asarray(crop_box), size)
    crop = cv2.warpAffine(
        image,
        a,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return crop, _valid_mask(np.asarray(crop_box), size, image.shape[0], image.shape[1])


def box_mask_in_crop(box: np.ndarray, crop_box: np.ndarray, size: int) -> np.ndarray:
    """(S, S) bool: crop pixels whose centre lies inside ``box`` (both in image coordinates)."""
    centres = np.arange(size) + 0.5
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    xs = x0 + centres * (x1 - x0) / size
    ys = y0 + centres * (y1 - y0) / size
    bx0, by0, bx1, by1 = (float(v) for v in box)
    return ((ys >= by0) & (ys < by1))[:, None] & ((xs >= bx0) & (xs < bx1))[None, :]


def paste_mask(
    mask: np.ndarray,
    crop_box: np.ndarray,
    image_hw: tuple[int, int],
    box: np.ndarray | None = None,
) -> np.ndarray:
    """Paste an (h, w) crop-space mask (any resolution, e.g. S/4) back into the full image.

    Bilinear resampling through the inverse crop map, evaluated only over the crop's footprint.
    Pixels outside the crop box are 0; when ``box`` is given, pixels outside it are 0 too
    ("zero outside the box").

    Returns:
        (H, W) float32 mask of the same value range as ``mask``.
    """
    height, width = image_hw
    out = np.zeros((height, width), dtype=np.float32)
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    if box is not None:
        bx0, by0, bx1, by1 = (float(v) for v in box)
        x0, y0, x1, y1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
    ix0, iy0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    ix1, iy1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
    if ix1 <= ix0 or iy1 <= iy0:
        return out
    mh, mw = mask.shape[:2]
    cx0, cy0, cx1, cy1 = (float(v) for v in crop_box)
    sx, sy = mw / (cx1 - cx0), mh / (cy1 - cy0)
    # mask coord of output pixel (i, j) in the region: u = (ix0 + i + 0.5 - cx0) * sx - 0.5
    inv = np.array(
        [[sx, 0.0, (ix0 + 0.5 - cx0) * sx - 0.5], [0.0, sy, (iy0 + 0.5 - cy0) * sy - 0.5]]
    )
    region = cv2.warpAffine(
        mask.astype(np.float32),
        inv,
        (ix1 - ix0, iy1 - iy0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if box is not None:
        centres_x = np.arange(ix0, ix1) + 0.5
        centres_y = np.arange(iy0, iy1) + 0.5
        inside = ((centres_y >= y0) & (centres_y < y1))[:, None] & (
            (centres_x >= x0) & (centres_x < x1)
        )[None, :]
        region = region * inside
    out[iy0:iy1, ix0:ix1] = region
    return out
