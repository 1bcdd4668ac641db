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
* weakest masks: the 24 lowest-score masks (mask, box, four clicks, score, IoU with the GT)
  and the histogram of every mask's score, drawn from what the eval stage streamed out of the
  masks table (``eval/weakest_masks.json``, :mod:`exits.evaluate.weakest`);
* a retrieval figure: for a few val crops, the initial FG points (extreme points moved inward)
  and the retrieved pseudo-FG / pseudo-BG patches of the configured similarity source, drawn
  from what the eval stage saved (``eval/retrieval_examples.npz`` + ``.json``).

The report draws only: it computes no metric and runs no model.

A figure that cannot be drawn (missing inputs, unreadable files) shows "figure unavailable:
reason" instead of failing the report.

Layout: ``common`` (run state, constants, plain-data blocks), ``sections`` (tables),
``figures`` (PNGs), ``template.html.j2`` (the page; Jinja2 autoescape escapes every value).
"""

from __future__ import annotations

import datetime as _dt
from importlib import resources
from typing import Any

import jinja2
import markupsafe

from exits import storage
from exits.report.common import (
    EXAMPLES_JSON,
    EXAMPLES_NPZ,
    FIGURE_ERRORS,
    INDEX,
    Block,
    Run,
    heading,
    load_run,
)
from exits.report.figures import loss_curve, overlay_section, retrieval_section, weakest_section
from exits.report.sections import (
    ap_table,
    errors_section,
    label_table,
    miou_table,
    retrieval_table,
    status_section,
)

__all__ = ["EXAMPLES_JSON", "EXAMPLES_NPZ", "FIGURE_ERRORS", "render_html", "write_report"]

TEMPLATE = "template.html.j2"
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


def _template() -> jinja2.Template:
    text = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(text)


def render_html(r: Run, max_overlays: int) -> str:
    blocks: list[Block] = [
        *status_section(r),
        heading("Metrics"),
        *retrieval_table(r),
        *miou_table(r),
        *ap_table(r),
        *label_table(r),
        heading("Loss curves"),
        *loss_curve(r, "warmup"),
        *loss_curve(r, "generator"),
        *errors_section(r),
        *overlay_section(r, max_overlays),
        *weakest_section(r),
        *retrieval_section(r, max_overlays),
    ]
    versions = sorted(
        {str(m.get("code_version")) for m in r.manifests.values() if m and m.get("code_version")}
    )
    dataset = (
        (r.eval_metrics or {}).get("dataset")
        or ((r.config or {}).get("data") or {}).get("name")
        or "?"
    )
    context: dict[str, Any] = {
        "css": markupsafe.Markup(CSS),  # a constant of this module, not run data
        "run": r.uri,
        "dataset": dataset,
        "generated": _dt.datetime.now(tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "versions": versions,
        "blocks": blocks,
    }
    return _template().render(**context)


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
    r = load_run(run, pending)
    page = render_html(r, max_overlays)
    uri = storage.join(r.out, INDEX)
    storage.publish_bytes(uri, page.encode("utf-8"))
    return uri
