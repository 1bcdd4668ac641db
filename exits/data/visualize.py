"""Drawings for humans (used by the report and the training stages): overlay PNGs of instance
masks and extreme points, loss curves."""

from __future__ import annotations

import json
import os
import tempfile

import cv2
import numpy as np

from exits.data import rle
from exits.data.coco import segmentation_to_rle

COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]],
    dtype=np.float32,
)  # fmt: skip


def _decode(segm: dict | list, h: int, w: int) -> np.ndarray:
    """COCO polygons / uncompressed / compressed RLE -> (H, W) bool (all False when absent)."""
    coded = segmentation_to_rle(segm, h, w)
    return rle.decode(coded) if coded is not None else np.zeros((h, w), bool)


def draw_instances(
    image: np.ndarray,
    masks: list[np.ndarray],
    points: list[np.ndarray] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend (H, W) bool masks onto an (H, W, 3) uint8 RGB image; draw (4, 2) extreme points."""
    out = image.astype(np.float32).copy()
    for k, m in enumerate(masks):
        c = COLOURS[k % len(COLOURS)]
        out[m] = out[m] * (1 - alpha) + c * alpha
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(float(v) for v in c), 1)
    out = out.astype(np.uint8)
    for k, pts in enumerate(points or []):
        c = tuple(int(v) for v in COLOURS[k % len(COLOURS)])
        for x, y in np.asarray(pts).reshape(-1, 2):
            cv2.circle(out, (int(x), int(y)), 2, (255, 255, 255), -1)
            cv2.circle(out, (int(x), int(y)), 2, c, 1)
    return out


def overlay_dataset(
    annotations: str, images_dir: str, out_png: str, n: int = 8, scale: int = 2
) -> str:
    """Write a grid of the first ``n`` images of a COCO json with their masks overlaid."""
    from exits.data.extreme_points import extreme_points_from_mask

    with open(annotations) as f:
        data = json.load(f)
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    tiles = []
    for img in data["images"][:n]:
        image = cv2.imread(os.path.join(images_dir, img["file_name"]), cv2.IMREAD_COLOR)[..., ::-1]
        masks = [
            _decode(a["segmentation"], img["height"], img["width"])
            for a in by_image.get(img["id"], [])
        ]
        pts = [extreme_points_from_mask(m) for m in masks if m.any()]
        tile = draw_instances(image, masks, pts)
        tiles.append(cv2.resize(tile, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST))
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 2), (0, 0))) for t in tiles]
    cols = 4
    rows = [
        np.concatenate(
            tiles[i : i + cols] + [np.zeros_like(tiles[0])] * (cols - len(tiles[i : i + cols])),
            axis=1,
        )
        for i in range(0, len(tiles), cols)
    ]
    grid = np.concatenate(rows, axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    cv2.imwrite(out_png, grid[..., ::-1])
    return out_png


def loss_curve_png(history: list[dict]) -> bytes:
    """PNG of every ``loss*`` key of ``history`` (one dict per logged step, with "step")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted(k for k in history[0] if k.startswith("loss")):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout, 100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with tempfile.TemporaryFile() as f:
        fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        f.seek(0)
        return f.read()
