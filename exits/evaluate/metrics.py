"""Evaluation: mask AP (COCO / LVIS), retention rate and pseudo-label mIoU.

Run as a module::

    python -m exits.evaluate --gt GT.json --pred PRED.json [--pred-gt-trained PRED_GT.json] \
        [--pseudo PSEUDO.json] --out DIR

Conventions
-----------
* Ground truth (``--gt``) is a COCO (or LVIS v1) instances json; masks may be polygons,
  uncompressed or compressed RLE. ``iscrowd`` is read by prepare's rule: JSON true/false or
  0/1 (absent: 0); anything else (the string ``"0"``) is an error naming the annotation id.
* Detections (``--pred``) are either a COCO *results* list (``image_id``, ``category_id``,
  ``segmentation`` RLE, ``score``, optional ``bbox``) or a COCO-style dict whose
  ``annotations`` are used as results (a pseudo-label json qualifies; missing ``score`` = 1).
* A pseudo-label json has the GT json's images/categories and one annotation per GT instance
  with the **same annotation id**, an RLE ``segmentation`` (``{"size": [h, w], "counts": str}``),
  ``bbox``, ``area``, ``score``, ``category_id`` and ``iscrowd: 0``.
* mIoU = mean over GT instances (non-crowd, non-empty) of IoU(pseudo mask, GT mask); a GT
  instance without a pseudo annotation scores IoU 0 and is counted in ``missing``.
* Separated subset (paper Table 4, "Separated COCO"): GT masks with >= 2 connected
  components, counted with ``cv2.connectedComponents`` at 8-connectivity (pixels touching
  only at a corner are one component; the conservative choice).
* Size buckets follow COCO's area thresholds on the GT annotation's ``area`` field:
  small < 32², 32² <= medium < 96², large >= 96² (COCOeval's own ranges overlap at the
  boundaries; ours are half-open so every instance lands in exactly one bucket).
* All RLE work goes through :mod:`exits.data.rle` (pycocotools).

Outputs in ``--out``: ``metrics.json`` (machine-readable) and ``metrics.md`` (tables).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from exits.data import rle
from exits.evaluate.checks import gt_crowd, gt_with_masks, usable_detections
from exits.evaluate.miou import MiouSums, box_mask

logger = logging.getLogger(__name__)

# COCOeval.stats order for iouType segm / bbox (12 numbers).
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
IOU_TYPES: tuple[str, ...] = ("segm", "bbox")
DEFAULT_SCORE = 1.0  # score given to annotations used as detections when they carry none

JsonLike = str | os.PathLike | Mapping[str, Any]


# --------------------------------------------------------------------------- loading
def load_json(src: JsonLike | Sequence[Mapping[str, Any]]) -> Any:
    """Load a json file (local path or URI readable by :mod:`exits.storage`) or pass data through."""
    if isinstance(src, Mapping | list | tuple):
        return src
    from exits.data.jsonstream import loads  # the one JSON reader (BOM, duplicate keys, depth)

    path = os.fspath(src)
    if "://" in path:
        from exits import storage  # URI support lives there; local paths need no import

        return loads(storage.read_bytes(path), path)
    with open(path, "rb") as f:
        return loads(f.read(), path)


def coco_from(src: JsonLike) -> COCO:
    """Build a pycocotools ``COCO`` index from a path/URI or an in-memory dict (quietly).

    Each annotation's ``iscrowd`` becomes 0/1 by prepare's rule (:func:`exits.evaluate.checks.
    gt_crowd`; absent: 0): COCOeval ignores any truthy value, so ``"0"`` would be a crowd
    region; a value that is not a boolean or 0/1 is a ``ValueError`` naming the annotation."""
    data = copy.deepcopy(dict(load_json(src)))
    for ann in data.get("annotations", []):
        if isinstance(ann, dict):
            ann["iscrowd"] = int(gt_crowd(ann))
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def is_lvis(gt: Mapping[str, Any]) -> bool:
    """True for an LVIS v1 json (categories carry ``frequency``; images carry LVIS fields)."""
    cats = gt.get("categories") or [{}]
    images = gt.get("images") or [{}]
    return "frequency" in cats[0] or "not_exhaustive_category_ids" in images[0]


def detections_from(src: JsonLike | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalise detections to a COCO results list (copies; ``score`` defaults to 1)."""
    data = load_json(src)
    anns = data.get("annotations") if isinstance(data, Mapping) else data
    if not isinstance(anns, list | tuple):
        raise ValueError("predictions must be a COCO results list or a dict with 'annotations'")
    results = []
    for ann in anns:
        if not isinstance(ann, Mapping):
            raise ValueError(f"a prediction must be a JSON object, got {type(ann).__name__}")
        det = {k: ann[k] for k in ("image_id", "category_id", "segmentation", "bbox") if k in ann}
        score = ann.get("score", DEFAULT_SCORE)
        det["score"] = score if isinstance(score, int | float) else math.nan  # checks.py drops it
        results.append(det)
    return results


# --------------------------------------------------------------------------- mask AP
def _coco_eval(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """Run COCOeval for one iou type; no detections → every stat 0."""
    if not results:
        return dict.fromkeys(COCO_STAT_NAMES, 0.0)
    if iou_type == "bbox":  # bbox from the mask when a result has only a mask
        results = [{**r, "bbox": r.get("bbox") or rle.bbox(r["segmentation"])} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size range has no GT; keep it as NaN-free -1.
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats)}


def mask_ap(
    gt_json: JsonLike,
    det_json: JsonLike | Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, dict[str, float]]:
    """COCO AP of detections against GT.

    Args:
        gt_json: COCO instances json (path/URI or dict).
        det_json: COCO results list, or a COCO-style dict whose annotations are the results.
        iou_types: subset of ``("segm", "bbox")``.

    Returns:
        ``{iou_type: {"AP": .., "AP50": .., ..., "ARl": ..}}`` with values in [0, 1]
        (-1 where COCOeval finds no GT in a size range), plus ``"skipped": {iou_type:
        {reason: count}}`` when predictions had to be left out (:mod:`exits.evaluate.checks`).
    """
    data = load_json(gt_json)
    results = detections_from(det_json)
    out: dict[str, Any] = {}
    for t in iou_types:
        gt_t, no_mask = gt_with_masks(data) if t == "segm" else (data, 0)
        gt = coco_from(gt_t)
        keep, skipped = usable_detections(gt.dataset, results, t)
        out[t] = _coco_eval(gt, keep, t)
        if no_mask:
            skipped["GT annotations without a mask (left out)"] = no_mask
        if skipped:
            out.setdefault("skipped", {})[t] = skipped
    return out


def lvis_ap(
    gt_json: JsonLike,
    det_json: JsonLike | Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, dict[str, float]]:
    """LVIS AP with the ``lvis`` package's federated evaluation (AP, APr/APc/APf).

    A detection of category c on image i counts only where c is verified for i: c is
    annotated on i (a true or false positive) or listed in i's ``neg_category_ids`` (a false
    positive); elsewhere it is ignored, unlike COCOeval.
    """
    from lvis import LVIS, LVISEval, LVISResults

    from exits.compat import lvis_numpy_compat

    lvis_numpy_compat()
    all_results = detections_from(det_json)
    with tempfile.TemporaryDirectory(prefix="exits-lvis-") as tmp:
        gt_path = os.path.join(tmp, "gt.json")  # LVIS() reads a file
        with open(gt_path, "w") as f:
            json.dump(load_json(gt_json), f)
        gt = LVIS(gt_path)
    out = {"evaluator": "lvis"}
    for t in iou_types:
        results, skipped = usable_detections(gt.dataset, all_results, t)
        if skipped:
            out.setdefault("skipped", {})[t] = skipped
        ev = LVISEval(gt, LVISResults(gt, copy.deepcopy(results)), iou_type=t)
        ev.run()
        out[t] = {k: float(v) for k, v in ev.get_results().items()}
    return out


def retention(ap_pseudo: float, ap_gt: float) -> float:
    """Retention rate = AP(trained on pseudo masks) / AP(same model trained on GT masks).

    Returns NaN when ``ap_gt`` is not positive (undefined ratio).
    """
    if ap_gt is None or ap_pseudo is None or not ap_gt > 0:
        return math.nan
    return float(ap_pseudo) / float(ap_gt)


# --------------------------------------------------------------------------- pseudo-label mIoU
def pseudo_label_miou(gt_json: JsonLike, pseudo_json: JsonLike) -> dict[str, Any]:
    """Pseudo-label mIoU vs GT, matched by annotation id.

    Returns:
        ``{"all": {"miou", "count"}, "separated": {...}, "small": {...}, "medium": {...},
        "large": {...}, "missing": int, "extra": int}``; ``missing`` = GT instances without a
        pseudo label (scored 0), ``extra`` = pseudo annotations whose id is not an evaluated GT
        instance (ignored). Crowd and empty GT instances are skipped, and so are GT instances
        without a usable mask (box-only, or a mask that does not fit its image), counted in
        ``no_gt_mask``; a pseudo mask that does not fit its GT image (or names another image)
        scores 0 and is counted in ``invalid_pseudo``.
    """
    gt, pseudo = load_json(gt_json), load_json(pseudo_json)
    images = {i.get("id"): i for i in gt.get("images", []) if isinstance(i, Mapping)}
    pseudo_anns = {a.get("id"): a for a in pseudo.get("annotations", []) if isinstance(a, Mapping)}
    sums, evaluated = MiouSums(), set()
    for gt_ann in gt.get("annotations", []):
        if not isinstance(gt_ann, Mapping):
            continue
        ann_id = gt_ann.get("id")
        if sums.score(gt_ann, images.get(gt_ann.get("image_id")), pseudo_anns.get(ann_id)):
            evaluated.add(ann_id)
    sums.extra = len(set(pseudo_anns) - evaluated)
    return sums.summary()


def box_masks_json(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pseudo-label json whose mask is each instance's box, keyed by ann id (the baseline).

    ``rows`` are instance-table rows; the box is the one the labeller crops
    (:func:`exits.data.crops.row_box`: extreme points, else the COCO bbox). Rows without a
    valid box get no annotation (scored as ``missing``).
    """
    from exits.data.crops import row_box

    anns = []
    for r in rows:
        try:
            box, _ = row_box(dict(r))
        except ValueError:
            continue
        segm = rle.encode(box_mask(box, r["height"], r["width"]))
        anns.append({"id": r["ann_id"], "image_id": r["image_id"], "category_id": r["category_id"],
                     "segmentation": segm, "iscrowd": 0, "area": float(rle.area(segm))})  # fmt: skip
    return {"images": [], "annotations": anns, "categories": []}


def box_baseline_miou(gt_json: JsonLike, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """mIoU of box-as-mask vs GT, in :func:`pseudo_label_miou`'s format: the baseline that
    every pseudo-label mIoU is reported beside (how much better than the box the masks are)."""
    gt = load_json(gt_json)
    boxes = box_masks_json(rows)
    boxes["images"], boxes["categories"] = gt.get("images", []), gt.get("categories", [])
    return pseudo_label_miou(gt, boxes)


# --------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_report(metrics: Mapping[str, Any]) -> str:
    """Human-readable markdown tables of :func:`evaluate` output."""
    lines = ["# EXITS evaluation", ""]
    for key, title in (
        ("mask_ap", "Mask AP (predictions)"),
        ("mask_ap_gt_trained", "Mask AP (model trained on GT masks)"),
        ("pseudo_label_ap", "Pseudo labels scored as detections"),
    ):
        block = metrics.get(key)
        if not block:
            continue
        lines += [f"## {title}", ""]
        if "evaluator" in block:
            lines += [f"evaluator: {block['evaluator']}", ""]
        types = [t for t in block if t not in ("evaluator", "skipped")]
        names = list(block[types[0]])
        lines += ["| type | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(_fmt(block[t][n]) for n in names) + " |" for t in types]
        if block.get("skipped"):
            lines += [f"predictions left out: {block['skipped']}"]
        lines.append("")
    if metrics.get("retention"):
        lines += ["## Retention (AP pseudo-trained / AP GT-trained)", "", "| type | retention |"]
        lines += ["|---|---|"] + [f"| {t} | {_fmt(v)} |" for t, v in metrics["retention"].items()]
        lines.append("")
    if metrics.get("pseudo_label_miou"):
        m = metrics["pseudo_label_miou"]
        box = metrics.get("pseudo_label_miou_box") or {}
        lines += ["## Pseudo-label mIoU vs GT", ""]
        lines += ["| subset | mIoU | box-as-mask mIoU | count |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {_fmt(m[k]['miou'])} | {_fmt((box.get(k) or {}).get('miou', '–'))} "
            f"| {m[k]['count']} |"
            for k in ("all", "separated", "small", "medium", "large")
        ]
        lines += ["", f"missing pseudo labels: {m['missing']}, extra: {m['extra']}", ""]
    return "\n".join(lines)


def evaluate(
    gt_json: JsonLike,
    pred_json: JsonLike | None = None,
    pred_gt_trained_json: JsonLike | None = None,
    pseudo_json: JsonLike | None = None,
    lvis: bool | None = None,
) -> dict[str, Any]:
    """All metrics that the given inputs allow (see module docstring).

    Args:
        gt_json: GT instances json.
        pred_json: detections of the model trained on pseudo masks.
        pred_gt_trained_json: detections of the same model trained on GT masks (→ retention).
        pseudo_json: pseudo-label json (→ mIoU and pseudo labels scored as detections).
        lvis: force (True/False) the LVIS metric; None = detect from the GT json.
    """
    gt = load_json(gt_json)
    use_lvis = is_lvis(gt) if lvis is None else lvis
    ap_fn = lvis_ap if use_lvis else mask_ap
    out: dict[str, Any] = {"gt": _name(gt_json), "metric": "lvis" if use_lvis else "coco"}
    if pred_json is not None:
        out["mask_ap"] = ap_fn(gt, pred_json)
    if pred_gt_trained_json is not None:
        out["mask_ap_gt_trained"] = ap_fn(gt, pred_gt_trained_json)
    if pred_json is not None and pred_gt_trained_json is not None:
        out["retention"] = {
            t: retention(out["mask_ap"][t]["AP"], out["mask_ap_gt_trained"][t]["AP"])
            for t in IOU_TYPES
            if t in out["mask_ap"] and t in out["mask_ap_gt_trained"]
        }
    if pseudo_json is not None:
        out["pseudo_label_miou"] = pseudo_label_miou(gt, pseudo_json)
        out["pseudo_label_ap"] = ap_fn(gt, pseudo_json)
    return out


def mmdet_metrics_table(metrics: dict) -> dict:
    """mmdet's flat ``coco/segm_mAP_50``-style keys -> {"segm": {"mAP_50": ...}, "bbox": {...}}.

    A missing key means mmdet found no detections (its CocoMetric then returns nothing): 0.
    """
    out: dict = {}
    for iou_type in ("segm", "bbox"):
        names = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
        vals = {
            n: float(v) for k, v in metrics.items() for n in names if k.endswith(f"/{iou_type}_{n}")
        }
        out[iou_type] = {n: vals.get(n, 0.0) for n in names}
    return out


def _name(src: Any) -> str | None:
    return os.fspath(src) if isinstance(src, str | os.PathLike) else None


def write_metrics(metrics: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir`` (created); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "metrics.json")
    md_path = os.path.join(out_dir, "metrics.md")
    with open(json_path, "w") as f:
        json.dump(metrics, f, indent=2, allow_nan=True)
    with open(md_path, "w") as f:
        f.write(markdown_report(metrics))
    return json_path, md_path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gt", required=True, help="GT instances json (COCO or LVIS v1)")
    p.add_argument("--pred", help="detections of the model trained on pseudo masks")
    p.add_argument("--pred-gt-trained", help="detections of the same model trained on GT masks")
    p.add_argument("--pseudo", help="pseudo-label json (same images/ids as --gt)")
    p.add_argument("--lvis", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = evaluate(args.gt, args.pred, args.pred_gt_trained, args.pseudo, lvis=args.lvis)
    except (ValueError, OSError) as e:  # unreadable / not-JSON / not-COCO input: one line
        raise SystemExit(f"exits.evaluate: {e}") from None
    json_path, md_path = write_metrics(metrics, args.out)
    print(markdown_report(metrics))
    logger.info("wrote %s and %s", json_path, md_path)
    return metrics
