"""What the report's sections and figures share: the run's state, constants, plain-data blocks.

A block is a dict the template draws (``kind`` plus fields); no module here writes HTML.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits import manifest, storage
from exits.data.images import ImageError

log = logging.getLogger("exits.report")

REPORT_DIR = "report"
INDEX = "index.html"
ERROR_ROWS = 50
OVERLAY_MIN_SIDE = 256  # small images are upscaled (nearest) to at least this height
OVERLAY_MAX_SIDE = 640  # large images are downscaled to at most this side
RETRIEVAL_TILE = 288  # pixels per retrieval crop tile
EXAMPLES_NPZ = "retrieval_examples.npz"  # written by the eval stage (exits.pipeline.eval)
EXAMPLES_JSON = "retrieval_examples.json"  # their meta, or {"unavailable": reason}
WEAKEST_JSON = "weakest_masks.json"  # eval's lowest-score masks + score histogram
WEAK_TILE = 160  # pixels per weakest-mask tile
WEAK_COLUMNS = 6  # tiles per row of the weakest-masks figure
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

Block = dict[str, Any]


# ----------------------------------------------------------------------------- blocks
def fmt(value: Any) -> str:
    """Human formatting of a metric/count value (plain text; the template escapes it)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def heading(text: str, level: int = 2) -> Block:
    return {"kind": "h", "level": level, "text": text}


def table(header: list[str], rows: Iterable[list[Any]], numeric_from: int = 1) -> Block:
    """A table block; cells at index >= ``numeric_from`` that are numbers (or None) are
    formatted with :func:`fmt` and right-aligned."""
    out = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if i >= numeric_from and (v is None or isinstance(v, int | float | np.number)):
                cells.append({"text": fmt(v), "num": True})
            else:
                cells.append({"text": "–" if v is None else str(v)})
        out.append(cells)
    return {"kind": "table", "header": list(header), "rows": out}


def unavailable(reason: Any) -> Block:
    return {"kind": "unavailable", "text": str(reason)}


def missing(what: str) -> Block:
    return {"kind": "missing", "text": what}


def figure(src: str, caption: str) -> Block:
    return {"kind": "figure", "src": src, "caption": caption}


def time_text(ts: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(ts), tz=_dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
    except (TypeError, ValueError, OverflowError, OSError):
        return "–"


# ----------------------------------------------------------------------------- reading
def read_json(uri: str) -> dict | None:
    """A json object, or None when absent/unreadable (logged)."""
    try:
        if not storage.exists(uri):
            return None
        obj = storage.read_json(uri)
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", uri, e)
        return None
    return obj if isinstance(obj, dict) else None


def read_parquet(uri: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    fs, path = storage.get_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def parquet_files(uri: str) -> list[str]:
    return [f for f in storage.list_dir(uri) if f.endswith(".parquet")]


def png(image_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out.extend(flatten(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}"))
        return out
    return [(prefix, d)]


# ----------------------------------------------------------------------------- run state
@dataclasses.dataclass
class Run:
    uri: str
    out: str  # <run>/report
    manifests: dict[str, dict | None]
    folders: set[str]
    eval_metrics: dict | None
    config: dict | None

    def m(self, stage: str) -> dict:
        return self.manifests.get(stage) or {}


def load_run(run: str, pending: dict[str, dict] | None = None) -> Run:
    manifests = {
        s: read_json(manifest.stage_uri(run, s, manifest.MANIFEST)) for s in manifest.STAGES
    }
    manifests.update(pending or {})
    folders = {s for s in manifest.STAGES if storage.exists(manifest.stage_uri(run, s))}
    metrics = read_json(manifest.stage_uri(run, "eval", "metrics.json"))
    return Run(
        run,
        storage.join(run, REPORT_DIR),
        manifests,
        folders,
        metrics,
        read_json(storage.join(run, "config.json")),
    )
