"""The report's figures: PNGs under ``<run>/report/`` drawn from saved artifacts (loss curves,
pseudo masks vs GT overlays, the retrieval examples and the weakest masks the eval stage
saved), each returned as plain-data blocks. A figure that cannot be drawn returns an "unavailable" block with the reason.
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
    WEAK_COLUMNS,
    WEAK_TILE,
    WEAKEST_JSON,
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
    table,
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
            image = load_image_under(images, rows[0]["file_name"],  # prepare's byte limit
                                     max_bytes=(prep.get("config") or {}).get("max_image_bytes"))  # fmt: skip
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


# ----------------------------------------------------------------------------- weakest masks
def _score_histogram_png(edges: list[float], counts: list[int]) -> bytes:
    """Bar chart of the score histogram eval saved (``bins`` edges, counts per bin)."""
    import matplotlib

    from exits.data.visualize import figure_png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = np.asarray(edges, np.float64)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(e[:-1], counts, width=np.diff(e), align="edge", color="#4c72b0", edgecolor="white")
    ax.set_xlim(float(e[0]), float(e[-1]))
    ax.set_xlabel("mask quality score")
    ax.set_ylabel("masks")
    ax.grid(alpha=0.3, axis="y")
    return figure_png(fig)


def _weak_tile(image: np.ndarray, entry: dict) -> np.ndarray:
    """One weak mask: the box enlarged x1.3 around it, the mask blended, the box (white) and
    the four clicks, resized to WEAK_TILE px with a caption bar (ann id, score, IoU)."""
    from exits.data.visualize import draw_instances

    h, w = image.shape[:2]
    mask = _decode_rle(entry.get("segmentation"), h, w)
    pts = entry.get("extreme_points")
    points = [np.asarray(pts)] if pts is not None else []
    drawn = draw_instances(image, [mask], points)
    x0, y0, x1, y1 = (float(v) for v in entry["box"])
    cv2.rectangle(drawn, (int(x0), int(y0)), (int(math.ceil(x1)) - 1, int(math.ceil(y1)) - 1),
                  (255, 255, 255), 1)  # fmt: skip
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 0.65
    c0, r0 = max(int(cx - half), 0), max(int(cy - half), 0)
    c1, r1 = min(int(math.ceil(cx + half)), w), min(int(math.ceil(cy + half)), h)
    region = drawn[r0:r1, c0:c1]
    s = WEAK_TILE / max(region.shape[:2])
    size = (max(1, round(region.shape[1] * s)), max(1, round(region.shape[0] * s)))
    region = cv2.resize(region, size, interpolation=cv2.INTER_NEAREST if s > 1 else cv2.INTER_AREA)
    tile = np.full((WEAK_TILE, WEAK_TILE, 3), 255, np.uint8)
    tile[: region.shape[0], : region.shape[1]] = region
    iou = entry.get("iou")
    text = f"{entry['ann_id']}  s {entry['score']:.2f}" + (
        f"  IoU {iou:.2f}" if iou is not None else ""
    )
    return _titled(tile, text)


def weakest_section(r: Run) -> list[Block]:
    """The lowest-score masks (eval/weakest_masks.json: eval streamed the masks table) as
    overlays, and the histogram of every mask's score."""
    from exits.data.images import load_image_under

    title = heading("Weakest masks (lowest quality score)")
    try:
        data = read_json(manifest.stage_uri(r.uri, "eval", WEAKEST_JSON))
        if data is None:
            raise FileNotFoundError(f"eval/{WEAKEST_JSON} missing (the eval stage has not run)")
        if "unavailable" in data:
            raise ValueError(data["unavailable"])
        label = r.m("label")
        below = (label.get("export") or {}).get("below_min_score")
        text = f"{fmt(data['count'])} masks scored."
        if below:
            min_score = (label.get("config") or {}).get("min_score")
            text += (f" {fmt(below)} below label.min_score {fmt(min_score)} were left out of "
                     "stage 2's json (they stay in label/masks).")  # fmt: skip
        blocks: list[Block] = [title, {"kind": "p", "text": text}]
        storage.publish_bytes(storage.join(r.out, "score_histogram.png"),
                              _score_histogram_png(data["bins"], data["histogram"]))  # fmt: skip
        blocks.append(figure("score_histogram.png", "Quality score of every mask"))
        images = r.m("prepare")["data"]["images"]
        max_bytes = (r.m("prepare").get("config") or {}).get("max_image_bytes")  # prepare's
    except FIGURE_ERRORS as e:
        return [title, unavailable(f"{type(e).__name__}: {e}")]
    tiles, cache, skipped = [], {}, []
    for entry in data["weakest"]:
        try:
            name = entry["file_name"]
            if name not in cache:
                cache.clear()
                cache[name] = load_image_under(images, name, max_bytes=max_bytes)
            tiles.append(_weak_tile(cache[name], entry))
        except FIGURE_ERRORS as e:
            skipped.append(f"ann {entry.get('ann_id')}: {type(e).__name__}: {e}")
    if tiles:
        blank = np.full_like(tiles[0], 255)
        rows = [tiles[k : k + WEAK_COLUMNS] for k in range(0, len(tiles), WEAK_COLUMNS)]
        rows = [_side_by_side(row + [blank] * (WEAK_COLUMNS - len(row))) for row in rows]
        gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
        grid = np.concatenate([x for row in rows for x in (row, gap)][:-1], axis=0)
        storage.publish_bytes(storage.join(r.out, "weakest_masks.png"), png(grid))
        caption = (f"The {len(tiles)} lowest-score masks, lowest first (left to right, top to "
                   "bottom): ann id, score s and IoU with the GT mask where one exists; white: "
                   "the box, dots: the four extreme points.")  # fmt: skip
        blocks.append(figure("weakest_masks.png", caption))
    if data["weakest"]:
        listed = [[k + 1, e.get("ann_id"), e.get("image_id"), e.get("score"), e.get("iou")]
                  for k, e in enumerate(data["weakest"])]  # fmt: skip
        blocks.append(table(["rank", "ann_id", "image_id", "score", "IoU"], listed, 3))
    blocks += [unavailable(s) for s in skipped]
    return blocks
