"""The run report: ``<run>/report/index.html`` plus the PNGs it shows, for humans.

:func:`write_report` reads whatever the run directory (local path or ``s3://``) holds and
renders one self-contained page (inline CSS, no scripts):

* per-stage status table: status, seconds, start/finish, key counts; a stage without a
  manifest is "not run" (or "incomplete" when its folder exists without a manifest);
* metric tables: retrieval precision/recall/AUC per similarity source (stage 1a), pseudo-label
  mIoU all/separated/small/medium/large (stage 1b held-out, and the labelled train set from
  eval), each with the box-as-mask baseline eval computed in the row below it, mask AP
  (stage 2: the segm/bbox AP figures only), the labelling summary (stage 1c);
* loss curves of stage 1a and 1b (their ``loss.png``, or re-plotted from ``metrics.csv``);
* the errors table (first rows with reasons, counts by reason);
* overlays: pseudo masks (``label/masks``) next to the GT (``prepare`` instance table) with
  the extreme points, for a few images;
* a retrieval figure: for a few val crops, the initial FG points (extreme points moved inward)
  and the retrieved pseudo-FG / pseudo-BG patches of the configured similarity source, drawn
  from what the eval stage saved (``eval/retrieval_examples.npz`` + ``.json``).

The report draws only: it computes no metric and runs no model.

A figure that cannot be drawn (missing inputs, unreadable files) shows "figure unavailable:
reason" instead of failing the report.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import html
import io
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits import manifest, storage
from exits.data.images import ImageError

log = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
ERROR_ROWS = 50
OVERLAY_MIN_SIDE = 256  # small images are upscaled (nearest) to at least this height
OVERLAY_MAX_SIDE = 640  # large images are downscaled to at most this side
RETRIEVAL_TILE = 288  # pixels per retrieval crop tile
MIOU_GROUPS = ("all", "separated", "small", "medium", "large")
# a stage-2 AP figure: mmdet's "coco/segm_mAP_50", eval's "segm.mAP_50" (not iter, epoch, lr)
AP_KEY = re.compile(r"(?:^|[/._])(?:segm|bbox)[/._]m?AP")
RETRIEVAL_KEYS = (
    "fg_precision",
    "fg_recall",
    "bg_precision",
    "bg_recall",
    "auc",
    "fg_per_crop",
    "bg_per_crop",
)
LABEL_KEYS = (
    "instances",
    "masks",
    "errors",
    "prepare_errors",
    "empty_masks",
    "crops",
    "crops_per_s",
    "shards",
    "seconds",
)
# What a figure may fail with; anything else is a bug and propagates.
FIGURE_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, ImageError)

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
     color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.done{color:#1a7f37;font-weight:600}.failed{color:#c62828;font-weight:600}
.notrun{color:#888;font-style:italic}.incomplete{color:#b26a00;font-weight:600}
.unavailable{color:#b26a00;background:#fff8e1;padding:.4em .7em;border-left:3px solid #f0a500}
figure{display:inline-block;margin:.5em 1em .8em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555;max-width:720px}
img{border:1px solid #ccc;image-rendering:pixelated}
.meta{color:#666;font-size:.9em}.legend span{display:inline-block;padding:0 .5em;margin-right:.5em}
"""


# ----------------------------------------------------------------------------- small helpers
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """Human formatting of a metric/count value (already escaped)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return _esc(value)
    if isinstance(value, int | np.integer):
        return _esc(f"{int(value):,}")
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 1000:
            return _esc(f"{v:,.0f}")
        return _esc(f"{v:.4g}")
    if isinstance(value, dict | list):
        return _esc(json.dumps(value, default=str))
    return _esc(value)


def _table(header: list[str], rows: Iterable[list[Any]], numeric_from: int = 1) -> str:
    """An HTML table; cells at index >= ``numeric_from`` are formatted as numbers."""
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if i >= numeric_from and (v is None or isinstance(v, int | float | np.number)):
                cells.append(f'<td class="num">{_fmt(v)}</td>')
            else:
                cells.append(f"<td>{'–' if v is None else _esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _unavailable(reason: Any) -> str:
    return f'<p class="unavailable">figure unavailable: {_esc(reason)}</p>'


def _missing(what: str) -> str:
    return f'<p class="notrun">{_esc(what)}</p>'


def _img(name: str, caption: str, width: int | None = None) -> str:
    w = f' width="{int(width)}"' if width else ""
    return f'<figure><img src="{_esc(name)}" alt="{_esc(caption)}"{w}><figcaption>{_esc(caption)}</figcaption></figure>'


def _time(ts: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(ts), tz=_dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
    except (TypeError, ValueError, OverflowError, OSError):
        return "–"


def _read_json(uri: str) -> dict | None:
    """A json object, or None when absent/unreadable (logged)."""
    try:
        if not storage.exists(uri):
            return None
        obj = storage.read_json(uri)
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", uri, e)
        return None
    return obj if isinstance(obj, dict) else None


def _read_parquet(uri: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    fs, path = storage.get_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def _parquet_files(uri: str) -> list[str]:
    return [f for f in storage.list_dir(uri) if f.endswith(".parquet")]


def _png(image_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out.extend(_flatten(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}"))
        return out
    return [(prefix, d)]


# ----------------------------------------------------------------------------- run state
@dataclasses.dataclass
class _Run:
    uri: str
    out: str  # <run>/report
    manifests: dict[str, dict | None]
    folders: set[str]
    eval_metrics: dict | None
    config: dict | None

    def m(self, stage: str) -> dict:
        return self.manifests.get(stage) or {}


def _load_run(run: str, pending: dict[str, dict] | None = None) -> _Run:
    manifests = {
        s: _read_json(manifest.stage_uri(run, s, manifest.MANIFEST)) for s in manifest.STAGES
    }
    manifests.update(pending or {})
    folders = {s for s in manifest.STAGES if storage.exists(manifest.stage_uri(run, s))}
    metrics = _read_json(manifest.stage_uri(run, "eval", "metrics.json"))
    return _Run(
        run,
        storage.join(run, REPORT_DIR),
        manifests,
        folders,
        metrics,
        _read_json(storage.join(run, "config.json")),
    )


# ----------------------------------------------------------------------------- sections
def _stage_counts(stage: str, m: dict) -> list[tuple[str, Any]]:
    if stage == "prepare":
        return list((m.get("counts") or {}).items())
    if stage in ("warmup", "generator"):
        return [(k, m.get(k)) for k in ("steps", "final_loss", "samples_per_s") if k in m]
    if stage == "label":
        s = m.get("summary") or {}
        return [(k, s.get(k)) for k in ("instances", "masks", "errors", "crops_per_s") if k in s]
    if stage == "stage2":
        return _ap_items(m.get("metrics") or {})[:4]
    if stage == "eval":
        return [("report", "yes")] if m.get("report") else []
    return []


def _status_section(r: _Run) -> str:
    rows = []
    for stage in manifest.STAGES:
        m = r.manifests.get(stage)
        if m is None:
            status = "incomplete" if stage in r.folders else "not run"
            cls = "incomplete" if stage in r.folders else "notrun"
            title = "folder exists without manifest.json" if stage in r.folders else "no manifest"
            rows.append(f'<tr><td>{_esc(stage)}</td><td class="{cls}" title="{_esc(title)}">{_esc(status)}</td>'
                        '<td class="num">–</td><td>–</td><td>–</td><td>–</td></tr>')  # fmt: skip
            continue
        status = str(m.get("status", "unknown"))
        cls = "done" if status == "done" else ("failed" if status == "failed" else "incomplete")
        counts = ", ".join(f"{k}={_fmt(v)}" for k, v in _stage_counts(stage, m))
        err = m.get("error")
        if err:
            counts = (counts + "; " if counts else "") + f"error: {_esc(err)}"
        rows.append(
            f'<tr><td>{_esc(stage)}</td><td class="{cls}">{_esc(status)}</td>'
            f'<td class="num">{_fmt(m.get("seconds"))}</td><td>{_esc(_time(m.get("started")))}</td>'
            f"<td>{_esc(_time(m.get('finished')))}</td><td>{counts or '–'}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("stage", "status", "seconds", "started", "finished", "key counts")
    )
    return "<h2>Stages</h2>\n<table><tr>" + head + "</tr>\n" + "\n".join(rows) + "</table>"


def _retrieval_table(r: _Run) -> str:
    metrics = r.m("warmup").get("metrics") or (r.eval_metrics or {}).get("retrieval") or {}
    rows = []
    for key, vals in metrics.items():
        if key.startswith("retrieval_") and isinstance(vals, dict):
            rows.append([key[len("retrieval_") :], *[vals.get(k) for k in RETRIEVAL_KEYS]])
    if not rows:
        return "<h3>Retrieval quality (stage 1a, val crops)</h3>" + _missing(
            "not run (no warmup retrieval metrics)"
        )
    return "<h3>Retrieval quality (stage 1a, val crops)</h3>" + _table(
        ["similarity source", *RETRIEVAL_KEYS], rows
    )


def _miou_row(name: str, d: dict) -> list[Any]:
    row: list[Any] = [name]
    for g in MIOU_GROUPS:
        v = d.get(g) or {}
        row.append(v.get("miou") if isinstance(v, dict) else v)
    for g in MIOU_GROUPS:
        v = d.get(g) or {}
        row.append(v.get("count") if isinstance(v, dict) else None)
    return [*row, d.get("missing"), d.get("extra")]


def _miou_table(r: _Run) -> str:
    rows = []
    held = (r.m("generator").get("metrics") or {}).get("pseudo_label") or (
        r.eval_metrics or {}
    ).get("pseudo_label_heldout")
    ev = r.eval_metrics or {}
    baseline = "↳ box as mask (baseline)"
    if isinstance(held, dict):
        rows.append(_miou_row("held-out val (stage 1b generator)", held))
        box = ev.get("pseudo_label_heldout_box")
        rows.append(_miou_row(baseline, box if isinstance(box, dict) else {}))
    train = ev.get("pseudo_label_miou")
    if isinstance(train, dict):
        rows.append(_miou_row("train pseudo labels (stage 1c)", train))
        box = ev.get("pseudo_label_miou_box")
        rows.append(_miou_row(baseline, box if isinstance(box, dict) else {}))
    title = "<h3>Pseudo-label mIoU</h3>"
    if not rows:
        return title + _missing("not run (no generator / eval metrics)")
    header = [
        "set",
        *[f"mIoU {g}" for g in MIOU_GROUPS],
        *[f"n {g}" for g in MIOU_GROUPS],
        "missing",
        "extra",
    ]
    return title + _table(header, rows)


def _ap_items(metrics: dict) -> list[tuple[str, Any]]:
    """The segm/bbox AP figures of stage-2 metrics (mmdet's ``coco/segm_mAP_50`` or eval's
    ``segm.mAP_50``), without the bookkeeping mmdet reports beside them (iter, epoch, lr)."""
    return [(k, v) for k, v in _flatten(metrics) if AP_KEY.search(k) and isinstance(v, int | float)]


def _ap_table(r: _Run) -> str:
    metrics = r.m("stage2").get("metrics") or (r.eval_metrics or {}).get("mask_ap") or {}
    title = "<h3>Mask AP (stage 2)</h3>"
    rows = [[k, v] for k, v in _ap_items(metrics)]
    if not rows:
        return title + _missing("not run (no stage-2 metrics)")
    return title + _table(["metric", "value"], rows)


def _label_table(r: _Run) -> str:
    s = r.m("label").get("summary") or {}
    title = "<h3>Labelling (stage 1c)</h3>"
    if not s:
        return title + _missing("not run (no label summary)")
    keys = [k for k in LABEL_KEYS if k in s]
    return title + _table(keys, [[s[k] for k in keys]], numeric_from=0)


def _copy_loss_curve(r: _Run, stage: str) -> str:
    name = f"loss_{stage}.png"
    src = manifest.stage_uri(r.uri, stage, "loss.png")
    csv_uri = manifest.stage_uri(r.uri, stage, "metrics.csv")
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
            return f"<h3>{_esc(stage)}</h3>" + _unavailable(
                f"{stage} has no loss.png or metrics.csv (not run?)"
            )
        storage.publish_bytes(storage.join(r.out, name), data)
    except FIGURE_ERRORS as e:
        return f"<h3>{_esc(stage)}</h3>" + _unavailable(f"{type(e).__name__}: {e}")
    return f"<h3>{_esc(stage)}</h3>" + _img(name, f"{stage} loss per step")


_DIGITS = re.compile(r"\d+")


def _reason_kind(reason: str) -> str:
    """Group error reasons: text before the first ':' with numbers replaced by N."""
    head = str(reason or "").split(":", 1)[0].strip()
    return _DIGITS.sub("N", head) or "(no reason)"


def _read_errors(r: _Run) -> tuple[pa.Table | None, str]:
    label_dir = manifest.stage_uri(r.uri, "label", "errors")
    files = _parquet_files(label_dir)
    if files:  # label errors include the carried prepare errors (errors/prepare.parquet)
        cols = ["ann_id", "image_id", "stage", "reason"]
        tables = [_read_parquet(f, columns=cols) for f in files]
        tables = [t.cast(tables[0].schema) for t in tables]
        return pa.concat_tables(tables), "label/errors"
    prep = manifest.stage_uri(r.uri, "prepare", "errors.parquet")
    if storage.exists(prep):
        return _read_parquet(prep), "prepare/errors.parquet"
    return None, ""


def _errors_section(r: _Run) -> str:
    title = "<h2>Errors</h2>"
    try:
        table, source = _read_errors(r)
    except FIGURE_ERRORS as e:
        return title + _unavailable(f"cannot read error rows: {type(e).__name__}: {e}")
    if table is None:
        return title + _missing("not run (no error tables)")
    if table.num_rows == 0:
        return title + f"<p>No error rows in {_esc(source)}.</p>"
    rows = table.to_pylist()
    counts = Counter((str(x.get("stage")), _reason_kind(x.get("reason"))) for x in rows)
    parts = [
        title,
        f"<p>{_fmt(len(rows))} error rows in {_esc(source)}.</p>",
        "<h3>Counts by reason</h3>",
    ]
    parts.append(
        _table(
            ["stage", "reason", "count"],
            [[s, k, n] for (s, k), n in counts.most_common()],
            numeric_from=2,
        )
    )
    parts.append(f"<h3>First {min(ERROR_ROWS, len(rows))} rows</h3>")
    parts.append(
        _table(
            ["ann_id", "image_id", "stage", "reason"],
            [
                [x.get("ann_id"), x.get("image_id"), x.get("stage"), x.get("reason")]
                for x in rows[:ERROR_ROWS]
            ],
            numeric_from=4,
        )  # fmt: skip
    )
    return "\n".join(parts)


# ----------------------------------------------------------------------------- overlays
def _decode_rle(text: str | None, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not text:
        return np.zeros((h, w), bool)
    rle = json.loads(text)
    m = mask_utils.decode(
        {
            "size": rle["size"],
            "counts": rle["counts"].encode("ascii")
            if isinstance(rle["counts"], str)
            else rle["counts"],
        }
    )
    if m.shape != (h, w):
        raise ValueError(f"mask size {m.shape} != image size {(h, w)}")
    return m.astype(bool)


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


def _pick_mask_rows(r: _Run, n: int) -> dict[int, list[dict]]:
    """Pseudo-mask rows of the first ``n`` images with masks (reading as few shards as needed)."""
    by_image: dict[int, list[dict]] = {}
    cols = ["ann_id", "image_id", "segmentation", "score"]
    for f in _parquet_files(manifest.stage_uri(r.uri, "label", "masks")):
        for row in _read_parquet(f, columns=cols).to_pylist():
            if row["image_id"] in by_image or len(by_image) < n:
                by_image.setdefault(row["image_id"], []).append(row)
        if len(by_image) >= n:
            break
    return dict(sorted(by_image.items())[:n])


def _overlay_section(r: _Run, max_overlays: int) -> str:
    from exits.data.images import load_image
    from exits.data.visualize import draw_instances

    title = "<h2>Pseudo masks vs GT</h2>"
    if max_overlays <= 0:
        return title + _missing("disabled (max_overlays=0)")
    prep = r.m("prepare")
    inst_uri = manifest.stage_uri(r.uri, "prepare", "instances.parquet")
    if not prep or not storage.exists(inst_uri):
        return title + _unavailable("prepare has not run (no instance table)")
    try:
        images = prep["data"]["images"]
        pseudo = _pick_mask_rows(r, max_overlays)
        if not pseudo:
            return title + _unavailable("label has not run (no label/masks shards)")
        ids = list(pseudo)
        cols = [
            "image_id",
            "ann_id",
            "file_name",
            "height",
            "width",
            "extreme_points",
            "gt_segmentation",
        ]
        gt = _read_parquet(inst_uri, columns=cols, filters=[("image_id", "in", ids)]).to_pylist()
    except FIGURE_ERRORS as e:
        return title + _unavailable(f"{type(e).__name__}: {e}")
    gt_by_image: dict[int, list[dict]] = {}
    for row in gt:
        gt_by_image.setdefault(row["image_id"], []).append(row)
    figures = []
    for image_id in ids:
        rows = sorted(gt_by_image.get(image_id, []), key=lambda x: x["ann_id"])
        if not rows:
            figures.append(_unavailable(f"image {image_id}: no instance-table rows"))
            continue
        try:
            h, w = int(rows[0]["height"]), int(rows[0]["width"])
            image = load_image(storage.join(images, rows[0]["file_name"]))
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
            storage.publish_bytes(storage.join(r.out, name), _png(_side_by_side([left, right])))
        except FIGURE_ERRORS as e:
            figures.append(_unavailable(f"image {image_id}: {type(e).__name__}: {e}"))
            continue
        ious = [_iou(p, g) for p, g in zip(ps_masks, gt_masks) if g.any()]
        miou = (
            float(np.nanmean(ious))
            if ious and not all(math.isnan(v) for v in ious)
            else float("nan")
        )
        n_missing = sum(1 for x in rows if x["ann_id"] not in pseudo_by_ann)
        cap = f"image {image_id} ({rows[0]['file_name']}): {len(rows)} instances, mIoU {_fmt(miou)}"
        if n_missing:
            cap += f", {n_missing} without a pseudo mask"
        figures.append(_img(name, cap))
    legend = "<p class=\"meta\">Left: GT masks (prepare instance table); right: pseudo masks (label/masks); " \
             "dots: extreme points; same colour = same instance.</p>"  # fmt: skip
    return title + legend + "\n".join(figures)


# ----------------------------------------------------------------------------- retrieval
EXAMPLES_NPZ = "retrieval_examples.npz"  # written by the eval stage (exits.pipeline.eval)
EXAMPLES_JSON = "retrieval_examples.json"


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


def _retrieval_section(r: _Run, n_crops: int) -> str:
    title = "<h2>Point retrieval on val crops</h2>"
    if n_crops <= 0:
        return title + _missing("disabled")
    try:
        return title + _retrieval_figure(r, n_crops)
    except FIGURE_ERRORS as e:
        return title + _unavailable(f"{type(e).__name__}: {e}")


def _retrieval_figure(r: _Run, n_crops: int) -> str:
    """Draw the retrieval examples the eval stage saved (``eval/retrieval_examples.*``)."""
    meta = _read_json(manifest.stage_uri(r.uri, "eval", EXAMPLES_JSON))
    if meta is None:
        raise FileNotFoundError(f"eval/{EXAMPLES_JSON} missing (the eval stage has not run)")
    if "unavailable" in meta:
        raise ValueError(meta["unavailable"])
    with np.load(
        io.BytesIO(storage.read_bytes(manifest.stage_uri(r.uri, "eval", EXAMPLES_NPZ)))
    ) as z:
        ex = {k: z[k][:n_crops] for k in z.files}
    size, grid = int(meta["size"]), int(meta["grid"])
    scale = max(1, RETRIEVAL_TILE // size)
    ann_ids = meta.get("ann_ids") or []
    tiles, captions = [], []
    for i in range(len(ex["image"])):
        tiles.append(_draw_retrieval(ex, i, grid, scale))
        ann = ann_ids[i] if i < len(ann_ids) else "?"
        captions.append(f"ann {ann}: FG {int(ex['n_fg'][i])} (prec {_fmt(float(ex['prec_fg'][i]))}), "
                        f"BG {int(ex['n_bg'][i])} (prec {_fmt(float(ex['prec_bg'][i]))})")  # fmt: skip
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
    storage.publish_bytes(storage.join(r.out, "retrieval.png"), _png(grid_img))
    legend = (
        '<p class="legend">Each crop: left the input, right the retrieval (on a grey copy). '
        '<span style="border:2px solid #ffdc00">yellow squares: initial FG (extreme points moved '
        "inward)</span>"
        '<span style="background:#1ec81e;color:#fff">retrieved pseudo-FG</span>'
        '<span style="background:#e61e1e;color:#fff">retrieved pseudo-BG</span>'
        '<span style="color:#e61e1e">red dots: initial BG (outside the box)</span>'
        '<span style="color:#00a0c8">cyan: GT contour</span>'
        "<span>white: box and extreme points</span></p>"
    )
    line = (f"similarity <b>{_esc(meta.get('similarity'))}</b>, {_esc(meta.get('split'))} crops {size}×{size}, "
            f"grid {grid}×{grid}{_esc(meta.get('note', ''))}, threshold rule {_esc(meta.get('threshold_rule'))}, "
            f"hops {_esc(meta.get('hops'))}, δ {_esc(meta.get('delta'))}")  # fmt: skip
    caption = "Crops left to right, top to bottom: " + "; ".join(captions)
    return legend + f'<p class="meta">{line}</p>' + _img("retrieval.png", caption)


# ----------------------------------------------------------------------------- entry point
def render_html(r: _Run, max_overlays: int) -> str:
    sections = [
        _status_section(r),
        "<h2>Metrics</h2>",
        _retrieval_table(r),
        _miou_table(r),
        _ap_table(r),
        _label_table(r),
        "<h2>Loss curves</h2>",
        _copy_loss_curve(r, "warmup"),
        _copy_loss_curve(r, "generator"),
        _errors_section(r),
        _overlay_section(r, max_overlays),
        _retrieval_section(r, max_overlays),
    ]
    versions = sorted(
        {str(m.get("code_version")) for m in r.manifests.values() if m and m.get("code_version")}
    )
    generated = _dt.datetime.now(tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    dataset = (
        (r.eval_metrics or {}).get("dataset")
        or ((r.config or {}).get("data") or {}).get("name")
        or "?"
    )
    meta = f"run <code>{_esc(r.uri)}</code> · dataset {_esc(dataset)} · generated {_esc(generated)}"
    if versions:
        meta += f" · code {_esc(', '.join(versions))}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>EXITS run report</title><style>{CSS}</style></head><body>\n"
        f'<h1>EXITS run report</h1><p class="meta">{meta}</p>\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_report(run: str, max_overlays: int = 8, pending: dict[str, dict] | None = None) -> str:
    """Render ``<run>/report/index.html`` (and its PNGs) from whatever the run holds.

    Args:
        run: run directory (local path or ``s3://`` URI).
        max_overlays: images in the pseudo-vs-GT overlay section (also caps the retrieval
            crops, of which the eval stage saves 8); 0 disables both figures.
        pending: manifests of stages finishing now, by stage name, used instead of what the
            run holds: the eval stage draws the page before it publishes its own manifest.

    Returns:
        The URI of ``index.html``.
    """
    r = _load_run(run, pending)
    page = render_html(r, max_overlays)
    uri = storage.join(r.out, INDEX)
    storage.publish_bytes(uri, page.encode("utf-8"))
    return uri
