"""Stage adapter ``eval``: metrics.json / metrics.md of the run and the HTML report."""

from __future__ import annotations

import time

import pyarrow as pa

from exits import manifest, storage
from exits.config import PipelineConfig
from exits.evaluate.metrics import mmdet_metrics_table
from exits.pipeline.common import STAGES, data_paths, stage_uri


def _instance_rows(run: str, name: str) -> list[dict]:
    from exits.data.coco import read_table

    uri = stage_uri(run, "prepare", name)
    return read_table(uri).to_pylist() if storage.exists(uri) else []


def run_eval(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.evaluate import markdown_report, pseudo_label_miou
    from exits.evaluate.metrics import box_baseline_miou

    started = time.time()
    paths = data_paths(run)
    metrics: dict = {"dataset": cfg.data.name}
    label_m = manifest.read_manifest(run, "label") or {}
    if label_m.get("pseudo_json"):
        metrics["pseudo_label_miou"] = pseudo_label_miou(
            paths["annotations"], label_m["pseudo_json"]
        )
        metrics["pseudo_label_miou_box"] = box_baseline_miou(
            paths["annotations"], _instance_rows(run, "instances.parquet")
        )
        metrics["label_summary"] = label_m.get("summary", {})
    gen_m = manifest.read_manifest(run, "generator") or {}
    if gen_m.get("metrics", {}).get("pseudo_label"):
        from exits.evaluate.quality import gt_json_from_table

        metrics["pseudo_label_heldout"] = gen_m["metrics"]["pseudo_label"]
        rows = [r for r in _instance_rows(run, "val_instances.parquet") if r.get("gt_segmentation")]
        if rows:  # the held-out GT as the stage-1b metric sees it (quality.evaluate_generator)
            gt = gt_json_from_table(pa.Table.from_pylist(rows))
            metrics["pseudo_label_heldout_box"] = box_baseline_miou(gt, rows)
    warm_m = manifest.read_manifest(run, "warmup") or {}
    metrics["retrieval"] = warm_m.get("metrics", {})
    s2 = (manifest.read_manifest(run, "stage2") or {}).get("metrics") or {}
    if s2:
        metrics["mask_ap"] = mmdet_metrics_table(s2)
    metrics["stages"] = {
        s: {"seconds": (manifest.read_manifest(run, s) or {}).get("seconds")} for s in STAGES[:-1]
    }
    storage.write_json(stage_uri(run, "eval", "metrics.json"), metrics)
    storage.write_json(storage.join(run, "metrics.json"), metrics)
    storage.write_text(stage_uri(run, "eval", "metrics.md"), markdown_report(metrics))
    from exits.report import write_report

    # The page is drawn before this stage's manifest is published (the manifest comes last),
    # so the report is handed eval's own status rather than reading "incomplete" from disk.
    finished = time.time()
    own = {"stage": "eval", "status": "done", "started": started, "finished": finished,
           "seconds": round(finished - started, 2), "report": True}  # fmt: skip
    report = write_report(run, pending={"eval": own})
    return manifest.write_manifest(run, "eval", fp, started, metrics=metrics, report=report)
