"""Stage adapter ``eval``: metrics.json / metrics.md of the run and the HTML report."""

from __future__ import annotations

import io
import logging
import time

import numpy as np

from exits import manifest, storage
from exits.config import CropConfig, PipelineConfig, RetrievalConfig
from exits.evaluate.diagnostics import RETRIEVAL_EXAMPLES
from exits.evaluate.metrics import mmdet_metrics_table
from exits.pipeline.common import STAGES, data_paths, stage_uri
from exits.report import EXAMPLES_JSON, EXAMPLES_NPZ, FIGURE_ERRORS

logger = logging.getLogger(__name__)


def write_retrieval_examples(
    run: str, rcfg: RetrievalConfig, crop: CropConfig, n_crops: int = RETRIEVAL_EXAMPLES
) -> dict:
    """Retrieval on the first ``n_crops`` val crops (train crops without a val split), saved as
    ``<run>/eval/retrieval_examples.npz`` + ``.json`` for the report's figure (which draws
    only). Uses the warm-up model as extractor and grid when ``warmup/model.pt`` exists.

    Returns the meta dict written to the json. Raises on missing inputs.
    """
    import pyarrow.compute as pc
    import torch

    from exits.data.coco import read_table
    from exits.evaluate.diagnostics import retrieval_examples
    from exits.method.similarity import EXTRACTOR_SOURCES
    from exits.train.data import CropDataset, CropSpec

    prep = manifest.read_manifest(run, "prepare")
    if not prep:
        raise KeyError("prepare has not run")
    data = prep.get("data") or {}
    table_uri = stage_uri(run, "prepare", "val_instances.parquet")
    images, split = data.get("val_images") or data.get("images"), "val"
    if not storage.exists(table_uri):
        table_uri, images, split = stage_uri(run, "prepare", "instances.parquet"), data.get("images"), "train"  # fmt: skip
    if not images:
        raise KeyError("prepare manifest has no images prefix")
    table = read_table(table_uri)
    table = table.filter(pc.equal(table["supervision"], "extreme_points")).slice(0, n_crops)
    if table.num_rows == 0:
        raise ValueError(f"no {split} instances with extreme points")
    extractor, note, size, grid = None, "", crop.size, 0
    warm = stage_uri(run, "warmup", "model.pt")
    if storage.exists(warm):
        from exits.checkpoints import load_model

        model, _ = load_model(warm)
        grid, size = int(model.grid), int(getattr(model, "img_size", size) or size)
        if rcfg.similarity in EXTRACTOR_SOURCES:
            extractor = model
    elif rcfg.similarity in EXTRACTOR_SOURCES:
        raise ValueError(
            f"similarity {rcfg.similarity!r} needs the warmup extractor (warmup/model.pt missing)"
        )
    if grid <= 0:
        grid, note = size // 8, " (grid = crop size / 8: no warmup model)"
    spec = CropSpec(size=size, train=False, inference_enlarge=crop.inference_enlarge)
    # the byte limit prepare checked these images with (data.max_image_bytes)
    max_bytes = (prep.get("config") or {}).get("max_image_bytes")
    ds = CropDataset(table, images, spec, max_image_bytes=max_bytes)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    arrays = retrieval_examples(batch, grid, rcfg, extractor)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    storage.publish_bytes(stage_uri(run, "eval", EXAMPLES_NPZ), buf.getvalue())
    meta = {"similarity": rcfg.similarity, "split": split, "size": size, "grid": grid,
            "note": note, "threshold_rule": rcfg.threshold_rule, "hops": rcfg.hops,
            "delta": rcfg.delta, "ann_ids": table["ann_id"].to_pylist()}  # fmt: skip
    storage.write_json(stage_uri(run, "eval", EXAMPLES_JSON), meta)
    return meta


def run_eval(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.evaluate import markdown_report
    from exits.evaluate.streaming import table_box_baseline_miou, table_pseudo_label_miou

    started = time.time()
    data_paths(run)  # raises when prepare has not run
    metrics: dict = {"dataset": cfg.data.name}
    label_m = manifest.read_manifest(run, "label") or {}
    instances = stage_uri(run, "prepare", "instances.parquet")
    if label_m:  # streamed part by part: the driver holds sums, not instances
        metrics["pseudo_label_miou"] = table_pseudo_label_miou(
            stage_uri(run, "label", "masks"), instances
        )
        metrics["pseudo_label_miou_box"] = table_box_baseline_miou(instances)
        metrics["label_summary"] = label_m.get("summary", {})
    gen_m = manifest.read_manifest(run, "generator") or {}
    val = stage_uri(run, "prepare", "val_instances.parquet")
    if gen_m.get("metrics", {}).get("pseudo_label"):
        metrics["pseudo_label_heldout"] = gen_m["metrics"]["pseudo_label"]
        if storage.exists(val):  # the held-out GT as the stage-1b metric sees it (quality.py)
            heldout_box = table_box_baseline_miou(val)
            if heldout_box["all"]["count"]:
                metrics["pseudo_label_heldout_box"] = heldout_box
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
    try:
        write_retrieval_examples(run, cfg.retrieval, cfg.crop)
    except FIGURE_ERRORS as e:  # the report shows the reason instead of the figure
        logger.warning("retrieval examples unavailable: %s: %s", type(e).__name__, e)
        storage.write_json(stage_uri(run, "eval", EXAMPLES_JSON), {"unavailable": f"{type(e).__name__}: {e}"})  # fmt: skip
    from exits.evaluate.weakest import WEAKEST_JSON, write_weakest_masks

    try:  # the report's weakest-masks section: streamed here, drawn there
        write_weakest_masks(run)
    except FIGURE_ERRORS as e:
        logger.warning("weakest masks unavailable: %s: %s", type(e).__name__, e)
        storage.write_json(stage_uri(run, "eval", WEAKEST_JSON), {"unavailable": f"{type(e).__name__}: {e}"})  # fmt: skip
    from exits.report import write_report

    # The page is drawn before this stage's manifest is published (the manifest comes last),
    # so the report is handed eval's own status rather than reading "incomplete" from disk.
    finished = time.time()
    own = {"stage": "eval", "status": "done", "started": started, "finished": finished,
           "seconds": round(finished - started, 2), "report": True}  # fmt: skip
    report = write_report(run, pending={"eval": own})
    return manifest.write_manifest(run, "eval", fp, started, metrics=metrics, report=report)
