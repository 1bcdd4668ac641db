"""The report's tables as plain-data blocks: stage status, metrics, labelling, errors."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pyarrow as pa

from exits import manifest, storage
from exits.report.common import (
    AP_KEY,
    ERROR_ROWS,
    FIGURE_ERRORS,
    LABEL_KEYS,
    MIOU_GROUPS,
    RETRIEVAL_KEYS,
    Block,
    Run,
    flatten,
    fmt,
    heading,
    missing,
    parquet_files,
    read_parquet,
    table,
    time_text,
    unavailable,
)

STATUS_HEADER = ["stage", "status", "seconds", "started", "finished", "key counts"]
BASELINE = "↳ box as mask (baseline)"


def ap_items(metrics: dict) -> list[tuple[str, Any]]:
    """The segm/bbox AP figures of stage-2 metrics (mmdet's ``coco/segm_mAP_50`` or eval's
    ``segm.mAP_50``), without the bookkeeping mmdet reports beside them (iter, epoch, lr)."""
    return [(k, v) for k, v in flatten(metrics) if AP_KEY.search(k) and isinstance(v, int | float)]


def _stage_counts(stage: str, m: dict) -> list[tuple[str, Any]]:
    if stage == "prepare":
        return list((m.get("counts") or {}).items())
    if stage in ("warmup", "generator"):
        return [(k, m.get(k)) for k in ("steps", "final_loss", "samples_per_s") if k in m]
    if stage == "label":
        s = m.get("summary") or {}
        return [(k, s.get(k)) for k in ("instances", "masks", "errors", "crops_per_s") if k in s]
    if stage == "stage2":
        return ap_items(m.get("metrics") or {})[:4]
    if stage == "eval":
        return [("report", "yes")] if m.get("report") else []
    return []


def status_section(r: Run) -> list[Block]:
    rows = []
    for stage in manifest.STAGES:
        m = r.manifests.get(stage)
        if m is None:
            folder = stage in r.folders
            title = "folder exists without manifest.json" if folder else "no manifest"
            status = {"text": "incomplete" if folder else "not run",
                      "cls": "incomplete" if folder else "notrun", "title": title}  # fmt: skip
            rows.append([{"text": stage}, status, {"text": "–", "num": True},
                         {"text": "–"}, {"text": "–"}, {"text": "–"}])  # fmt: skip
            continue
        text = str(m.get("status", "unknown"))
        cls = "done" if text == "done" else ("failed" if text == "failed" else "incomplete")
        counts = ", ".join(f"{k}={fmt(v)}" for k, v in _stage_counts(stage, m))
        if m.get("error"):
            counts = (counts + "; " if counts else "") + f"error: {m['error']}"
        rows.append([{"text": stage}, {"text": text, "cls": cls},
                     {"text": fmt(m.get("seconds")), "num": True},
                     {"text": time_text(m.get("started"))}, {"text": time_text(m.get("finished"))},
                     {"text": counts or "–"}])  # fmt: skip
    return [heading("Stages"), {"kind": "table", "header": STATUS_HEADER, "rows": rows}]


def retrieval_table(r: Run) -> list[Block]:
    metrics = r.m("warmup").get("metrics") or (r.eval_metrics or {}).get("retrieval") or {}
    rows = [
        [key[len("retrieval_") :], *[vals.get(k) for k in RETRIEVAL_KEYS]]
        for key, vals in metrics.items()
        if key.startswith("retrieval_") and isinstance(vals, dict)
    ]
    title = heading("Retrieval quality (stage 1a, val crops)", 3)
    if not rows:
        return [title, missing("not run (no warmup retrieval metrics)")]
    return [title, table(["similarity source", *RETRIEVAL_KEYS], rows)]


def _miou_row(name: str, d: dict) -> list[Any]:
    row: list[Any] = [name]
    for g in MIOU_GROUPS:
        v = d.get(g) or {}
        row.append(v.get("miou") if isinstance(v, dict) else v)
    for g in MIOU_GROUPS:
        v = d.get(g) or {}
        row.append(v.get("count") if isinstance(v, dict) else None)
    return [*row, d.get("missing"), d.get("extra")]


def miou_table(r: Run) -> list[Block]:
    """Pseudo-label mIoU rows, each followed by its box-as-mask baseline (computed by eval)."""
    ev = r.eval_metrics or {}
    held = (r.m("generator").get("metrics") or {}).get("pseudo_label") or ev.get(
        "pseudo_label_heldout"
    )
    rows = []
    for name, value, box_key in (
        ("held-out val (stage 1b generator)", held, "pseudo_label_heldout_box"),
        ("train pseudo labels (stage 1c)", ev.get("pseudo_label_miou"), "pseudo_label_miou_box"),
    ):
        if isinstance(value, dict):
            box = ev.get(box_key)
            rows += [
                _miou_row(name, value),
                _miou_row(BASELINE, box if isinstance(box, dict) else {}),
            ]
    title = heading("Pseudo-label mIoU", 3)
    if not rows:
        return [title, missing("not run (no generator / eval metrics)")]
    header = ["set", *[f"mIoU {g}" for g in MIOU_GROUPS], *[f"n {g}" for g in MIOU_GROUPS],
              "missing", "extra"]  # fmt: skip
    return [title, table(header, rows)]


def ap_table(r: Run) -> list[Block]:
    metrics = r.m("stage2").get("metrics") or (r.eval_metrics or {}).get("mask_ap") or {}
    rows = [[k, v] for k, v in ap_items(metrics)]
    title = heading("Mask AP (stage 2)", 3)
    if not rows:
        return [title, missing("not run (no stage-2 metrics)")]
    return [title, table(["metric", "value"], rows)]


def label_table(r: Run) -> list[Block]:
    s = r.m("label").get("summary") or {}
    title = heading("Labelling (stage 1c)", 3)
    if not s:
        return [title, missing("not run (no label summary)")]
    keys = [k for k in LABEL_KEYS if k in s]
    return [title, table(keys, [[s[k] for k in keys]], numeric_from=0)]


_DIGITS = re.compile(r"\d+")


def _reason_kind(reason: str) -> str:
    """Group error reasons: text before the first ':' with numbers replaced by N."""
    head = str(reason or "").split(":", 1)[0].strip()
    return _DIGITS.sub("N", head) or "(no reason)"


def _read_errors(r: Run) -> tuple[pa.Table | None, str]:
    files = parquet_files(manifest.stage_uri(r.uri, "label", "errors"))
    if files:  # label errors include the carried prepare errors (errors/prepare.parquet)
        cols = ["ann_id", "image_id", "stage", "reason"]
        tables = [read_parquet(f, columns=cols) for f in files]
        tables = [t.cast(tables[0].schema) for t in tables]
        return pa.concat_tables(tables), "label/errors"
    prep = manifest.stage_uri(r.uri, "prepare", "errors.parquet")
    if storage.exists(prep):
        return read_parquet(prep), "prepare/errors.parquet"
    return None, ""


def errors_section(r: Run) -> list[Block]:
    title = heading("Errors")
    try:
        errors, source = _read_errors(r)
    except FIGURE_ERRORS as e:
        return [title, unavailable(f"cannot read error rows: {type(e).__name__}: {e}")]
    if errors is None:
        return [title, missing("not run (no error tables)")]
    if errors.num_rows == 0:
        return [title, {"kind": "p", "text": f"No error rows in {source}."}]
    rows = errors.to_pylist()
    counts = Counter((str(x.get("stage")), _reason_kind(x.get("reason"))) for x in rows)
    first = [[x.get("ann_id"), x.get("image_id"), x.get("stage"), x.get("reason")]
             for x in rows[:ERROR_ROWS]]  # fmt: skip
    return [
        title,
        {"kind": "p", "text": f"{fmt(len(rows))} error rows in {source}."},
        heading("Counts by reason", 3),
        table(["stage", "reason", "count"], [[s, k, n] for (s, k), n in counts.most_common()], 2),
        heading(f"First {min(ERROR_ROWS, len(rows))} rows", 3),
        table(["ann_id", "image_id", "stage", "reason"], first, numeric_from=4),
    ]
