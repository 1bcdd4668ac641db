"""The report's figures: PNGs under ``<run>/report/`` drawn from saved artifacts (loss curves,
pseudo masks vs GT overlays, the retrieval examples the eval stage saved), each returned as
plain-data blocks. A figure that cannot be drawn returns an "unavailable" block with the reason.
"""

from __future__ import annotations

import csv
import io
import math

import cv2
import numpy as np

from exits import manifest, storage
from exits.report.common import (
    EXAMPLES_JSON,
    EXAMPLES_NPZ,
    FIGURE_ERRORS,
    OVERLAY_MAX_SIDE,
    OVERLAY_MIN_SIDE,
    RETRIEVAL_TILE,
    Block,
    Run,
    figure,
    fmt,
    heading,
    missing,
    parquet_files,
    png,
    read_json,
    read_parquet,
    unavailable,
)


def loss_curve(r: Run, stage: str) -> list[Block]:
    """The stage's ``loss.png``, or one re-plotted from its ``metrics.csv``."""
    name = f"loss_{stage}.png"
    src = manifest.stage_uri(r.uri, stage, "loss.png")
    csv_uri = manifest.stage_uri(r.uri, stage, "metrics.csv")
    title = heading(stage, 3)
    try:
        if storage.exists(src):
            data = storage.read_bytes(src)
        elif storage.exists(csv_uri):
            from exits.data.visualize import loss_curve_png

            rows = list(csv.DictReader(io.StringIO(storage.read_text(csv_uri))))
            history = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]
            if not history:
                raise ValueError(f"{csv_uri} has no rows")
            data = loss_curve_png(history)
        else:
            return [title, unavailable(f"{stage} has no loss.png or metrics.csv (not run?)")]
        storage.publish_bytes(storage.join(r.out, name), data)
    except FIGURE_ERRORS as e:
        return [title, unavailable(f"{type(e).__name__}: {e}")]
    return [title, figure(name, f"{stage} loss per step")]


# ----------------------------------------------------------------------------- overlays
def _decode_rle(text: str | None, h: int, w: int) -> np.ndarray:
    from exits.data import rle

    if not text:
        return np.zeros((h, w), bool)
    m = rle.decode(rle.from_json(text))
    if m.shape != (h, w):
        raise ValueError(f"mask size {m.shape} != image size {(h, w)}")
    return m


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def _fit(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) > OVERLAY_MAX_SIDE:
        s = OVERLAY_MAX_SIDE / max(h, w)
        return cv2.resize(
            image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
        )
    if h < OVERLAY_MIN_SIDE:
        s = max(1, int(math.ceil(OVERLAY_MIN_SIDE / h)))
        return cv2.resize(image, (w * s, h * s), interpolation=cv2.INTER_NEAREST)
    return image


def _titled(image: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((22, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def _side_by_side(panels: list[np.ndarray], gap: int = 6) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    out = []
    for i, p in enumerate(panels):
        out.append(np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255))
        if i < len(panels) - 1:
            out.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(out, axis=1)


def _pick_mask_rows(r: Run, n: int) -> dict[int, list[dict]]:
    """Pseudo-mask rows of the first ``n`` images with masks (reading as few shards as needed)."""
    by_image: dict[int, list[dict]] = {}
    cols = ["ann_id", "image_id", "segmentation", "score"]
    for f in parquet_files(manifest.stage_uri(r.uri, "label", "masks")):
        for row in read_parquet(f, columns=cols).to_pylist():
            if row["image_id"] in by_image or len(by_image) < n:
                by_image.setdefault(row["image_id"], []).append(row)
        if len(by_image) >= n:
            break
    return dict(sorted(by_image.items())[:n])


def overlay_section(r: Run, max_overlays: int) -> list[Block]:
    """Pseudo masks (label/masks) next to the GT (prepare instance table), a few images."""
    from exits.data.images import load_image_under
    from exits.data.visualize import draw_instances

    title = heading("Pseudo masks vs GT")
    if max_overlays <= 0:
        return [title, missing("disabled (max_overlays=0)")]
    prep = r.m("prepare")
    inst_uri = manifest.stage_uri(r.uri, "prepare", "instances.parquet")
    if not prep or not storage.exists(inst_uri):
        return [title, unavailable("prepare has not run (no instance table)")]
    try:
        images = prep["data"]["images"]
        pseudo = _pick_mask_rows(r, max_overlays)
        if not pseudo:
            return [title, unavailable("label has not run (no label/masks shards)")]
        ids = list(pseudo)
        cols = ["image_id", "ann_id", "file_name", "height", "width", "extreme_points",
                "gt_segmentation"]  # fmt: skip
        gt = read_parquet(inst_uri, columns=cols, filters=[("image_id", "in", ids)]).to_pylist()
    except FIGURE_ERRORS as e:
        return [title, unavailable(f"{type(e).__name__}: {e}")]
    gt_by_image: dict[int, list[dict]] = {}
    for row in gt:
        gt_by_image.setdefault(row["image_id"], []).append(row)
    figures: list[Block] = []
    for image_id in ids:
        rows = sorted(gt_by_image.get(image_id, []), key=lambda x: x["ann_id"])
        if not rows:
            figures.append(unavailable(f"image {image_id}: no instance-table rows"))
            continue
        try:
            h, w = int(rows[0]["height"]), int(rows[0]["width"])
            image = load_image_under(images, rows[0]["file_name"])
            if image.shape[:2] != (h, w):
                raise ValueError(f"decoded size {image.shape[:2]} != table size {(h, w)}")
            pseudo_by_ann = {p["ann_id"]: p for p in pseudo[image_id]}
            gt_masks = [_decode_rle(x["gt_segmentation"], h, w) for x in rows]
            ps_masks = [
                _decode_rle((pseudo_by_ann.get(x["ann_id"]) or {}).get("segmentation"), h, w)
                for x in rows
            ]
            points = [
                np.asarray(x["extreme_points"]) for x in rows if x["extreme_points"] is not None
            ]
            left = _titled(_fit(draw_instances(image, gt_masks, points)), "GT")
            right = _titled(_fit(draw_instances(image, ps_masks, points)), "pseudo")
            name = f"overlay_{int(image_id)}.png"
            storage.publish_bytes(storage.join(r.out, name), png(_side_by_side([left, right])))
        except FIGURE_ERRORS as e:
            figures.append(unavailable(f"image {image_id}: {type(e).__name__}: {e}"))
            continue
        ious = [_iou(p, g) for p, g in zip(ps_masks, gt_masks) if g.any()]
        miou = (
            float(np.nanmean(ious))
            if ious and not all(math.isnan(v) for v in ious)
            else float("nan")
        )
        n_missing = sum(1 for x in rows if x["ann_id"] not in pseudo_by_ann)
        cap = f"image {image_id} ({rows[0]['file_name']}): {len(rows)} instances, mIoU {fmt(miou)}"
        if n_missing:
            cap += f", {n_missing} without a pseudo mask"
        figures.append(figure(name, cap))
    return [title, {"kind": "overlay_legend"}, *figures]


# ----------------------------------------------------------------------------- retrieval
def _patch_rect(k: int, grid: int, p: float) -> tuple[tuple[int, int], tuple[int, int]]:
    row, col = divmod(int(k), grid)
    return (round(col * p), round(row * p)), (round((col + 1) * p) - 1, round((row + 1) * p) - 1)


def _draw_retrieval(ex: dict, i: int, grid: int, scale: int) -> np.ndarray:
    """Two panels for crop ``i`` of the eval stage's retrieval examples: the input (box,
    extreme points, initial FG/BG points) and the retrieval (pseudo-FG green, pseudo-BG red
    over a grey crop; GT contour cyan)."""
    crop = ex["image"][i]
    S = crop.shape[0]
    side = S * scale
    big = cv2.resize(crop, (side, side), interpolation=cv2.INTER_NEAREST)
    p = side / grid
    fg, bg, in_box, labels = ex["fg"][i], ex["bg"][i], ex["in_box"][i], ex["labels"][i]
    yellow, green, red, cyan = (255, 220, 0), (30, 200, 30), (230, 30, 30), (0, 220, 255)
    box = [round(float(v) * scale) for v in ex["box"][i].tolist()]

    def decorate(img: np.ndarray, points: bool) -> None:
        cv2.rectangle(img, (box[0], box[1]), (box[2] - 1, box[3] - 1), (255, 255, 255), 1)
        for k in np.flatnonzero(fg):  # initial FG: the extreme points moved inward, as patches
            a, b = _patch_rect(k, grid, p)
            cv2.rectangle(img, a, b, yellow, 2)
        if points and bool(ex["has_points"][i]):
            for x, y in ex["points"][i]:
                c = (round((x + 0.5) * scale), round((y + 0.5) * scale))
                cv2.circle(img, c, 4, (255, 255, 255), -1)
                cv2.circle(img, c, 4, (0, 0, 0), 1)

    left = big.copy()
    for k in np.flatnonzero(bg):  # initial BG: patches outside the box, red dots
        row, col = divmod(int(k), grid)
        cv2.circle(left, (round((col + 0.5) * p), round((row + 0.5) * p)), 2, red, -1)
    decorate(left, points=True)

    grey = cv2.cvtColor(cv2.cvtColor(big, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB).astype(
        np.float32
    )
    overlay = grey.copy()
    retrieved = in_box & ~fg & ~bg
    for k in np.flatnonzero(retrieved & (labels == 1)):
        cv2.rectangle(overlay, *_patch_rect(k, grid, p), green, -1)
    for k in np.flatnonzero(retrieved & (labels == 0)):
        cv2.rectangle(overlay, *_patch_rect(k, grid, p), red, -1)
    right = np.clip(grey * 0.4 + overlay * 0.6, 0, 255).astype(np.uint8)
    gt = ex["gt"][i].astype(np.uint8)
    if gt.any():
        gt = cv2.resize(gt, (side, side), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(right, contours, -1, cyan, 1)
    decorate(right, points=False)
    return _side_by_side([left, right], gap=2)


def retrieval_section(r: Run, n_crops: int) -> list[Block]:
    title = heading("Point retrieval on val crops")
    if n_crops <= 0:
        return [title, missing("disabled")]
    try:
        return [title, *_retrieval_figure(r, n_crops)]
    except FIGURE_ERRORS as e:
        return [title, unavailable(f"{type(e).__name__}: {e}")]


def _retrieval_figure(r: Run, n_crops: int) -> list[Block]:
    """Draw the retrieval examples the eval stage saved (``eval/retrieval_examples.*``)."""
    meta = read_json(manifest.stage_uri(r.uri, "eval", EXAMPLES_JSON))
    if meta is None:
        raise FileNotFoundError(f"eval/{EXAMPLES_JSON} missing (the eval stage has not run)")
    if "unavailable" in meta:
        raise ValueError(meta["unavailable"])
    npz = storage.read_bytes(manifest.stage_uri(r.uri, "eval", EXAMPLES_NPZ))
    with np.load(io.BytesIO(npz)) as z:
        ex = {k: z[k][:n_crops] for k in z.files}
    size, grid = int(meta["size"]), int(meta["grid"])
    scale = max(1, RETRIEVAL_TILE // size)
    ann_ids = meta.get("ann_ids") or []
    tiles, captions = [], []
    for i in range(len(ex["image"])):
        tiles.append(_draw_retrieval(ex, i, grid, scale))
        ann = ann_ids[i] if i < len(ann_ids) else "?"
        captions.append(f"ann {ann}: FG {int(ex['n_fg'][i])} (prec {fmt(float(ex['prec_fg'][i]))}), "
                        f"BG {int(ex['n_bg'][i])} (prec {fmt(float(ex['prec_bg'][i]))})")  # fmt: skip
    if not tiles:
        raise ValueError("the eval stage saved no retrieval examples")
    cols = min(2, len(tiles))
    blank = np.full_like(tiles[0], 255)
    rows_img = []
    for k in range(0, len(tiles), cols):
        chunk = tiles[k : k + cols] + [blank] * (cols - len(tiles[k : k + cols]))
        rows_img.append(_side_by_side(chunk, gap=14))
    gap = np.full((14, rows_img[0].shape[1], 3), 255, np.uint8)
    grid_img = np.concatenate([x for row in rows_img for x in (row, gap)][:-1], axis=0)
    storage.publish_bytes(storage.join(r.out, "retrieval.png"), png(grid_img))
    legend = {"kind": "retrieval_legend", "size": size, "grid": grid, "note": meta.get("note", ""),
              **{k: meta.get(k) for k in ("similarity", "split", "threshold_rule", "hops", "delta")}}  # fmt: skip
    caption = "Crops left to right, top to bottom: " + "; ".join(captions)
    return [legend, figure("retrieval.png", caption)]
