"""Stage adapter ``stage2``: mmdetection on the pseudo-label json under Ray Train."""

from __future__ import annotations

import time
from dataclasses import asdict

from exits import manifest
from exits.config import PipelineConfig
from exits.pipeline.common import data_paths, stage_uri


def run_stage2(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.stage2.train_eval import train_and_evaluate

    started = time.time()
    paths = data_paths(run)
    label_m = manifest.read_manifest(run, "label")
    result = train_and_evaluate(
        cfg.stage2, cfg.data.name, train_json=label_m["pseudo_json"], val_json=paths["val_annotations"],
        images=paths["images"], val_images=paths["val_images"], work_uri=stage_uri(run, "stage2"),
    )  # fmt: skip
    return manifest.write_manifest(run, "stage2", fp, started, **result, config=asdict(cfg.stage2))
