"""The pipeline runner: stage fingerprints, skipping finished stages, running the rest in order."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from exits import manifest, storage
from exits.config import PipelineConfig, validate_config
from exits.pipeline import preflight
from exits.pipeline.common import STAGES
from exits.pipeline.eval import run_eval
from exits.pipeline.label import run_label
from exits.pipeline.prepare import run_prepare
from exits.pipeline.stage2 import run_stage2
from exits.pipeline.train import run_generator, run_warmup
from exits.progress import format_duration

log = logging.getLogger("exits.pipeline")


STAGE_FUNCS: dict[str, Callable[[PipelineConfig, str, str], dict]] = {
    "prepare": run_prepare,
    "warmup": run_warmup,
    "generator": run_generator,
    "label": run_label,
    "stage2": run_stage2,
    "eval": run_eval,
}


def stage_fingerprints(cfg: PipelineConfig, output: str | None = None) -> dict[str, str]:
    """Each stage's fingerprint chains its upstream's, so a config change redoes what follows.
    ``output``: the run, whose ``prepare/input_digests.json`` caches the inputs' digests."""
    fps: dict[str, str] = {}
    cache = manifest.stage_uri(output, "prepare", manifest.DIGEST_CACHE) if output else None
    parts = {
        "prepare": [
            asdict(cfg.data),
            manifest.content_digest(cfg.data.annotations, cfg.data.val_annotations, cache=cache),
        ],
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
    validate_config(cfg)  # also for configs built in code: before anything is written
    selected = list(stages or STAGES)
    unknown = set(selected) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {list(STAGES)}")
    if from_stage:
        selected = [s for s in STAGES if STAGES.index(s) >= STAGES.index(from_stage)]
    # unsatisfiable resource requests fail here, before any input is read, not hang later
    preflight.check_cluster(cfg, selected)
    storage.makedirs(output)
    storage.write_json(storage.join(output, "config.json"), asdict(cfg))
    fps = stage_fingerprints(cfg, output)
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
        log.info("stage %s: finished in %s", stage, format_duration(time.time() - t))
    return results


def summary_line(results: dict, output: str) -> str:
    report = storage.join(output, "report", "index.html")
    m = (results.get("eval") or {}).get("metrics", {})
    return json.dumps({"output": output, "report": report if storage.exists(report) else None,
                       "pseudo_label_heldout": m.get("pseudo_label_heldout", {}).get("all"),
                       "pseudo_label_heldout_box": m.get("pseudo_label_heldout_box", {}).get("all"),
                       "pseudo_label_train": m.get("pseudo_label_miou", {}).get("all"),
                       "pseudo_label_train_box": m.get("pseudo_label_miou_box", {}).get("all"),
                       "segm_mAP": m.get("mask_ap", {}).get("segm", {}).get("mAP")}, default=str)  # fmt: skip


def abspath_if_local(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.abspath(uri)
