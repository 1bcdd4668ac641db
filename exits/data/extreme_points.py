"""Extreme points from GT masks or polygons, following ExtremeNet's ``_get_extreme_points``.

Convention (docs/architecture.md): an extreme-point array is int32 ``(4, 2)`` ordered top, left, bottom,
right, each ``(x, y)`` in pixels, x right, y down.

The protocol (ExtremeNet, ``tools/gen_coco_extreme_points.py``), re-implemented:
  * ``pts`` is an ordered point list (polygon vertices, or mask pixels in row-major order);
  * the list is padded with its last point in front and its first point at the back, so a run
    can wrap around the start/end by one element;
  * for each side, take the first arg-extreme index, then extend a run of neighbouring indices
    in both directions while the coordinate stays within ``EXTREME_RUN_TOLERANCE`` x the box
    height (top/bottom) or width (left/right) of the extreme;
  * the output point lies on the exact extreme coordinate, at the floor-midpoint of the run's
    span along the other axis; cast to int.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EXTREME_RUN_TOLERANCE = 0.02  # ExtremeNet's `thresh`: run tolerance as a fraction of box h / w
PYTHON_PATH_MAX_POINTS = 2000  # up to this many points the protocol runs on Python floats

__all__ = [
    "extreme_points_from_polygons",
    "extreme_points_from_mask",
    "validate_extreme_points",
    "box_from_extreme_points",
]


def _run_indices(coord: Sequence[float], start: int, tol: float, sign: float) -> list[int]:
    """Indices of the run around ``start`` whose ``sign * (coord - coord[start]) <= tol``.

    ``sign`` = +1 for a minimum (top/left), -1 for a maximum (bottom/right).
    """
    idxs = [start]
    ref = coord[start]
    k = start + 1
    while k < len(coord) and sign * (coord[k] - ref) <= tol:
        idxs.append(k)
        k += 1
    k = start - 1
    while k >= 0 and sign * (coord[k] - ref) <= tol:
        idxs.append(k)
        k -= 1
    return idxs


def _extreme_points(pts: np.ndarray) -> np.ndarray:
    """ExtremeNet's protocol on an ordered ``(P, 2)`` array of (x, y) points."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        raise ValueError("no points to take extreme points from")
    if len(pts) <= PYTHON_PATH_MAX_POINTS:
        return _extreme_points_small(pts.tolist())
    x_min, y_min = pts[:, 0].min(), pts[:, 1].min()
    x_max, y_max = pts[:, 0].max(), pts[:, 1].max()
    w = x_max - x_min + 1
    h = y_max - y_min + 1
    padded = np.concatenate([pts[-1:], pts, pts[:1]], axis=0)
    xs, ys = padded[:, 0], padded[:, 1]

    def mid(values: np.ndarray) -> float:
        return (values.max() + values.min()) // 2

    top = _run_indices(ys, int(np.argmin(ys)), EXTREME_RUN_TOLERANCE * h, +1.0)
    bottom = _run_indices(ys, int(np.argmax(ys)), EXTREME_RUN_TOLERANCE * h, -1.0)
    left = _run_indices(xs, int(np.argmin(xs)), EXTREME_RUN_TOLERANCE * w, +1.0)
    right = _run_indices(xs, int(np.argmax(xs)), EXTREME_RUN_TOLERANCE * w, -1.0)
    out = np.array(
        [
            [mid(xs[top]), y_min],
            [x_min, mid(ys[left])],
            [mid(xs[bottom]), y_max],
            [x_max, mid(ys[right])],
        ]
    )
    return out.astype(np.int32)


def _extreme_points_small(pts: list[list[float]]) -> np.ndarray:
    """The same protocol in plain Python floats: several times faster for polygon-sized lists
    (numpy's per-call overhead dominates there); same arithmetic, same result."""
    padded = [pts[-1], *pts, pts[0]]
    xs, ys = [p[0] for p in padded], [p[1] for p in padded]
    x_min, x_max, y_min, y_max = min(xs), max(xs), min(ys), max(ys)
    w, h = x_max - x_min + 1, y_max - y_min + 1

    def mid(coord: list[float], idxs: list[int]) -> float:
        values = [coord[i] for i in idxs]
        return (max(values) + min(values)) // 2

    # list.index finds the first arg-extreme, as np.argmin / np.argmax do
    top = _run_indices(ys, ys.index(y_min), EXTREME_RUN_TOLERANCE * h, +1.0)
    bottom = _run_indices(ys, ys.index(y_max), EXTREME_RUN_TOLERANCE * h, -1.0)
    left = _run_indices(xs, xs.index(x_min), EXTREME_RUN_TOLERANCE * w, +1.0)
    right = _run_indices(xs, xs.index(x_max), EXTREME_RUN_TOLERANCE * w, -1.0)
    out = [[mid(xs, top), y_min], [x_min, mid(ys, left)],
           [mid(xs, bottom), y_max], [x_max, mid(ys, right)]]  # fmt: skip
    return np.array(out, dtype=np.float64).astype(np.int32)


def extreme_points_from_polygons(polygons: list[list[float]]) -> np.ndarray:
    """Extreme points of a COCO polygon annotation.

    Args:
        polygons: COCO ``segmentation`` polygons, each a flat list ``[x0, y0, x1, y1, ...]``.
            All vertices are concatenated in order.

    Returns:
        int32 array (4, 2): top, left, bottom, right, each (x, y).
    """
    flat = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons if len(p) >= 2]
    if not flat:
        raise ValueError("empty polygon list")
    return _extreme_points(np.concatenate(flat, axis=0))


def extreme_points_from_mask(mask: np.ndarray) -> np.ndarray:
    """Extreme points of a binary mask.

    Args:
        mask: (H, W) array, non-zero = foreground. Points are the foreground pixels as (x, y)
            in row-major order (the order of ``np.nonzero``).

    Returns:
        int32 array (4, 2): top, left, bottom, right, each (x, y).
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask")
    return _extreme_points(np.stack([xs, ys], axis=1))


def box_from_extreme_points(points: np.ndarray) -> np.ndarray:
    """Box ``[x0, y0, x1, y1]`` (float64, x1/y1 exclusive) from (..., 4, 2) extreme points.

    x0 = left.x, y0 = top.y, x1 = right.x + 1, y1 = bottom.y + 1 (docs/architecture.md conventions).
    """
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[..., 1, 0], p[..., 0, 1], p[..., 3, 0] + 1.0, p[..., 2, 1] + 1.0], axis=-1)


def validate_extreme_points(points: np.ndarray, height: int, width: int) -> str | None:
    """Return a reason string when ``points`` are unusable for an image of ``height x width``.

    Checks shape, finiteness, bounds, ordering (top above bottom, left of right, each point on
    the correct side of the box) and a non-zero-area box. Returns None when valid.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (4, 2):
        return f"extreme points must have shape (4, 2), got {p.shape}"
    p = p.tolist()  # Python floats: 4 points are cheaper to check one by one than in numpy
    xs, ys = [x for x, _ in p], [y for _, y in p]
    if not all(math.isfinite(v) for v in xs + ys):
        return "extreme points contain NaN or inf"
    if min(xs) < 0 or max(xs) > width - 1:
        return f"extreme point x outside the image (width {width})"
    if min(ys) < 0 or max(ys) > height - 1:
        return f"extreme point y outside the image (height {height})"
    (tx, ty), (lx, ly), (bx, by), (rx, ry) = p
    if ty > by:
        return "top point is below the bottom point"
    if lx > rx:
        return "left point is right of the right point"
    if ty > min(ly, ry, by) or by < max(ly, ry, ty):
        return "top/bottom points are not the vertical extremes"
    if lx > min(tx, bx, rx) or rx < max(tx, bx, lx):
        return "left/right points are not the horizontal extremes"
    if rx - lx < 1 or by - ty < 1:
        return "degenerate box: extreme points span less than 2 pixels in x or y"
    return None
