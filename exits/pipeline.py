"""The EXITS pipeline: prepare -> 1a warm-up -> 1b generator -> 1c label -> 2 stage2 -> eval.

Each stage reads the previous stages' artifacts from the run directory (local path or
``s3://``), writes its own under ``<run>/<stage>/`` and publishes ``manifest.json`` last. A stage
whose manifest carries the same fingerprint (its inputs' fingerprints + its config) is
skipped, so re-submitting a killed job continues where it stopped (stage 1b also resumes from
its last Ray Train checkpoint, stage 1c from its last committed shard).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from exits import manifest, storage
from exits.config import PipelineConfig
from exits.method.similarity import EXTRACTOR_SOURCES

log = logging.getLogger("exits.pipeline")

STAGES = manifest.STAGES


def _uri(run: str, stage: str, *parts: str) -> str:
    return manifest.stage_uri(run, stage, *parts)


# ----------------------------------------------------------------------------- prepare
def _demo_data(cfg: PipelineConfig, run: str) -> tuple[str, str, str, str]:
    """Generate the synthetic demo set under <run>/data (uploaded when the run is on s3)."""
    from exits.data.synthetic import write_demo_dataset

    d = cfg.data
    target = storage.join(run, "data")
    if storage.is_s3(run):
        with tempfile.TemporaryDirectory() as tmp:
            write_demo_dataset(tmp, d.synthetic_images, d.synthetic_image_size, d.synthetic_seed)
            storage.upload_dir(tmp, target)
    else:
        write_demo_dataset(target, d.synthetic_images, d.synthetic_image_size, d.synthetic_seed)
    ann = storage.join(target, "annotations")
    img = storage.join(target, "images")
    return (
        storage.join(ann, "instances_train.json"),
        img,
        storage.join(ann, "instances_val.json"),
        img,
    )


def _holdout_data(cfg: PipelineConfig, run: str) -> tuple[str, str]:
    """Split the train json into training and held-out jsons under <run>/data."""
    from exits.data.split import split_coco

    d = cfg.data
    coco = json.loads(storage.read_bytes(d.annotations))
    train, held = split_coco(coco, d.holdout_images, d.holdout_salt)
    target = storage.join(run, "data", "annotations")
    out = (
        storage.join(target, "instances_train.json"),
        storage.join(target, "instances_holdout.json"),
    )
    storage.publish_bytes(out[0], json.dumps(train).encode())
    storage.publish_bytes(out[1], json.dumps(held).encode())
    log.info(
        "holdout split: %d training / %d held-out images", len(train["images"]), len(held["images"])
    )
    return out


def data_paths(cfg: PipelineConfig, run: str) -> dict:
    m = manifest.read_manifest(run, "prepare")
    if m is None:
        raise RuntimeError(f"stage 'prepare' has not run in {run}")
    return m["data"]


def run_prepare(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.data.coco import load_instances, write_table

    started = time.time()
    d = cfg.data
    if d.annotations and d.holdout_images > 0 and not d.val_annotations:
        train_json, held_json = _holdout_data(cfg, run)
        paths = {"annotations": train_json, "images": d.images,
                 "val_annotations": held_json, "val_images": d.images}  # fmt: skip
    elif d.annotations:
        paths = {"annotations": d.annotations, "images": d.images,
                 "val_annotations": d.val_annotations or "", "val_images": d.val_images or d.images}  # fmt: skip
    elif d.name == "demo":
        ann, img, val, vimg = _demo_data(cfg, run)
        paths = {"annotations": ann, "images": img, "val_annotations": val, "val_images": vimg}
    else:
        raise ValueError(f"dataset {d.name!r} has no data.annotations configured")
    inst, err = load_instances(paths["annotations"], paths["images"])
    if d.max_instances > 0 and inst.num_rows > d.max_instances:
        inst = inst.slice(0, d.max_instances)
    write_table(inst, _uri(run, "prepare", "instances.parquet"))
    write_table(err, _uri(run, "prepare", "errors.parquet"))
    counts = {"instances": inst.num_rows, "errors": err.num_rows}
    if paths["val_annotations"]:
        vinst, verr = load_instances(paths["val_annotations"], paths["val_images"])
        write_table(vinst, _uri(run, "prepare", "val_instances.parquet"))
        counts.update(val_instances=vinst.num_rows, val_errors=verr.num_rows)
    counts["separated"] = int(sum(bool(s) for s in inst["separated"].to_pylist()))
    return manifest.write_manifest(
        run, "prepare", fp, started, data=paths, counts=counts, config=asdict(d)
    )


# ----------------------------------------------------------------------------- 1a / 1b
def _train_stage(cfg: PipelineConfig, run: str, fp: str, stage: str) -> dict:
    from exits.train.loops import loop_config
    from exits.train.run import fit, publish_artifacts

    started = time.time()
    paths = data_paths(cfg, run)
    tcfg = cfg.warmup if stage == "warmup" else cfg.generator
    extractor = None
    if (
        stage == "generator"
        and cfg.retrieval.similarity in EXTRACTOR_SOURCES
        and cfg.loss.objective == "exits"
    ):
        extractor = _uri(run, "warmup", "model.pt")
    loop = loop_config(
        stage, _uri(run, "prepare", "instances.parquet"), paths["images"], cfg.crop, cfg.model,
        cfg.retrieval, cfg.loss, tcfg, extractor_checkpoint=extractor, marker_dir=_uri(run, stage),
    )  # fmt: skip
    result = fit(loop, tcfg, _uri(run, stage, "ray"), name="train")
    if result.error is not None:
        raise RuntimeError(f"stage {stage} failed: {result.error}")
    art = publish_artifacts(result, _uri(run, stage))
    metrics = _stage_metrics(cfg, run, stage, paths, extractor)
    last = art["history"][-1] if art["history"] else {}
    return manifest.write_manifest(
        run, stage, fp, started,
        checkpoint=_uri(run, stage, "model.pt"), steps=art["steps"], final_loss=last.get("loss"),
        resumed_from_steps=art["resumed_from"],
        samples_per_s=_median([h.get("samples_per_s", 0.0) for h in art["history"]]),
        metrics=metrics, config={"train": asdict(tcfg), "loss": asdict(cfg.loss), "retrieval": asdict(cfg.retrieval)},
    )  # fmt: skip


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return float(xs[len(xs) // 2]) if xs else 0.0


def _stage_metrics(
    cfg: PipelineConfig, run: str, stage: str, paths: dict, extractor: str | None
) -> dict:
    """1a: retrieval quality of the configured similarity source; 1b: held-out pseudo-label mIoU."""
    import torch

    from exits.checkpoints import load_model
    from exits.data.coco import read_table
    from exits.evaluate.diagnostics import retrieval_stats
    from exits.evaluate.quality import evaluate_generator
    from exits.train.data import CropDataset, CropSpec

    val_uri = _uri(run, "prepare", "val_instances.parquet")
    if not storage.exists(val_uri):
        return {}
    table = read_table(val_uri)
    if table.num_rows == 0 or table["gt_segmentation"].null_count == table.num_rows:
        return {}
    model, _ = load_model(_uri(run, stage, "model.pt"))
    if stage == "warmup":
        spec = CropSpec(
            size=cfg.crop.size, train=False, inference_enlarge=cfg.crop.inference_enlarge
        )
        loader = torch.utils.data.DataLoader(
            CropDataset(table, paths["val_images"], spec), batch_size=32
        )
        out = {}
        for source in ("attention", cfg.retrieval.similarity):
            rc = cfg.retrieval.__class__(**{**asdict(cfg.retrieval), "similarity": source})
            out[f"retrieval_{source}"] = retrieval_stats(loader, model.grid, rc, extractor=model)
        return out
    return {"pseudo_label": evaluate_generator(model, table, paths["val_images"], cfg.crop.size,
                                               cfg.crop.inference_enlarge, cfg.label.threshold)}  # fmt: skip


def run_warmup(cfg: PipelineConfig, run: str, fp: str) -> dict:
    return _train_stage(cfg, run, fp, "warmup")


def run_generator(cfg: PipelineConfig, run: str, fp: str) -> dict:
    return _train_stage(cfg, run, fp, "generator")


# ----------------------------------------------------------------------------- 1c
def _fit_actor_pool(label_cfg):
    """CPU-only pools must leave a CPU for the decode/paste tasks, or Ray Data stalls.

    On a fixed-size cluster whose CPUs the actors would all take, shrink the pool (logged).
    GPU actors and autoscaling clusters (more CPUs than now) are left alone.
    """
    import dataclasses

    import ray

    if label_cfg.use_gpu or label_cfg.gpus_per_actor > 0:
        return label_cfg
    cpus = ray.cluster_resources().get("CPU", 0)
    fit = int((cpus - 1) // max(label_cfg.cpus_per_actor, 1e-9))
    if 0 < fit < label_cfg.num_actors:
        log.warning("label: %d CPU actor(s) on a %g-CPU cluster would starve decoding; using %d",
                    label_cfg.num_actors, cpus, fit)  # fmt: skip
        return dataclasses.replace(label_cfg, num_actors=fit)
    return label_cfg


def run_label(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.data.coco import read_table
    from exits.label import label_instances
    from exits.label.export import export_coco

    started = time.time()
    paths = data_paths(cfg, run)
    label_cfg = _fit_actor_pool(cfg.label)
    summary = label_instances(
        _uri(run, "prepare", "instances.parquet"), paths["images"], _uri(run, "generator", "model.pt"), run,
        cfg.crop, label_cfg, upstream_errors=read_table(_uri(run, "prepare", "errors.parquet")),
        shard_images=label_cfg.shard_images,
    )  # fmt: skip
    coco = export_coco(
        _uri(run, "label", "masks"), paths["annotations"], _uri(run, "label", "pseudo_coco.json")
    )
    return manifest.write_manifest(run, "label", fp, started, summary=summary, export=coco,
                                   pseudo_json=_uri(run, "label", "pseudo_coco.json"), config=asdict(cfg.label))  # fmt: skip


# ----------------------------------------------------------------------------- 2
def run_stage2(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.stage2.pipeline import train_and_evaluate

    started = time.time()
    paths = data_paths(cfg, run)
    label_m = manifest.read_manifest(run, "label")
    result = train_and_evaluate(
        cfg.stage2, cfg.data.name, train_json=label_m["pseudo_json"], val_json=paths["val_annotations"],
        images=paths["images"], val_images=paths["val_images"], work_uri=_uri(run, "stage2"),
    )  # fmt: skip
    return manifest.write_manifest(run, "stage2", fp, started, **result, config=asdict(cfg.stage2))


# ----------------------------------------------------------------------------- eval
def run_eval(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.evaluate import markdown_report, pseudo_label_miou

    started = time.time()
    paths = data_paths(cfg, run)
    metrics: dict = {"dataset": cfg.data.name}
    label_m = manifest.read_manifest(run, "label") or {}
    if label_m.get("pseudo_json"):
        metrics["pseudo_label_miou"] = pseudo_label_miou(
            paths["annotations"], label_m["pseudo_json"]
        )
        metrics["label_summary"] = label_m.get("summary", {})
    gen_m = manifest.read_manifest(run, "generator") or {}
    if gen_m.get("metrics", {}).get("pseudo_label"):
        metrics["pseudo_label_heldout"] = gen_m["metrics"]["pseudo_label"]
    warm_m = manifest.read_manifest(run, "warmup") or {}
    metrics["retrieval"] = warm_m.get("metrics", {})
    s2 = (manifest.read_manifest(run, "stage2") or {}).get("metrics") or {}
    if s2:
        metrics["mask_ap"] = mmdet_metrics_table(s2)
    metrics["stages"] = {
        s: {"seconds": (manifest.read_manifest(run, s) or {}).get("seconds")} for s in STAGES[:-1]
    }
    storage.write_json(_uri(run, "eval", "metrics.json"), metrics)
    storage.write_json(storage.join(run, "metrics.json"), metrics)
    storage.write_text(_uri(run, "eval", "metrics.md"), markdown_report(metrics))
    from exits.report import write_report

    report = write_report(run)
    return manifest.write_manifest(run, "eval", fp, started, metrics=metrics, report=report)


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


STAGE_FUNCS: dict[str, Callable[[PipelineConfig, str, str], dict]] = {
    "prepare": run_prepare,
    "warmup": run_warmup,
    "generator": run_generator,
    "label": run_label,
    "stage2": run_stage2,
    "eval": run_eval,
}


def stage_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Each stage's fingerprint chains its upstream's, so a config change redoes what follows."""
    fps: dict[str, str] = {}
    parts = {
        "prepare": [asdict(cfg.data)],
        "warmup": [asdict(cfg.crop), asdict(cfg.model), asdict(cfg.loss), asdict(cfg.warmup)],
        "generator": [asdict(cfg.retrieval), asdict(cfg.generator)],
        "label": [asdict(cfg.label)],
        "stage2": [asdict(cfg.stage2)],
        "eval": [],
    }
    prev = ""
    for s in STAGES:
        fps[s] = manifest.fingerprint(prev, parts[s])
        prev = fps[s]
    return fps


def run_pipeline(
    cfg: PipelineConfig,
    output: str,
    stages: Sequence[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
) -> dict:
    """Run the selected stages in order; returns {stage: manifest}."""
    selected = list(stages or STAGES)
    unknown = set(selected) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {list(STAGES)}")
    if from_stage:
        selected = [s for s in STAGES if STAGES.index(s) >= STAGES.index(from_stage)]
    storage.makedirs(output)
    storage.write_json(storage.join(output, "config.json"), asdict(cfg))
    fps = stage_fingerprints(cfg)
    results = {}
    for stage in STAGES:
        if stage not in selected:
            continue
        if not force and manifest.is_done(output, stage, fps[stage]):
            log.info("stage %s: done (manifest %s), skipping", stage, fps[stage])
            results[stage] = manifest.read_manifest(output, stage)
            continue
        log.info("stage %s: running", stage)
        t = time.time()
        results[stage] = STAGE_FUNCS[stage](cfg, output, fps[stage])
        log.info("stage %s: finished in %.1f s", stage, time.time() - t)
    return results


def summary_line(results: dict, output: str) -> str:
    report = storage.join(output, "report", "index.html")
    m = (results.get("eval") or {}).get("metrics", {})
    return json.dumps({"output": output, "report": report if storage.exists(report) else None,
                       "pseudo_label_heldout": m.get("pseudo_label_heldout", {}).get("all"),
                       "pseudo_label_train": m.get("pseudo_label_miou", {}).get("all"),
                       "segm_mAP": m.get("mask_ap", {}).get("segm", {}).get("mAP")}, default=str)  # fmt: skip


def abspath_if_local(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.abspath(uri)
