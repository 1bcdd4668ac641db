"""Stage adapter ``label`` (1c): pseudo-label every instance, export the COCO json."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from exits import manifest
from exits.config import PipelineConfig
from exits.label.plan import PSEUDO_JSON
from exits.pipeline.common import data_paths, stage_uri

log = logging.getLogger("exits.pipeline")


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
    fit = int((cpus - label_cfg.cpus_per_task) // max(label_cfg.cpus_per_actor, 1e-9))
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
    paths = data_paths(run)
    label_cfg = _fit_actor_pool(cfg.label)
    summary = label_instances(
        stage_uri(run, "prepare", "instances.parquet"), paths["images"], stage_uri(run, "generator", "model.pt"), run,
        cfg.crop, label_cfg, upstream_errors=read_table(stage_uri(run, "prepare", "errors.parquet")),
        shard_images=label_cfg.shard_images,
    )  # fmt: skip
    coco = export_coco(
        stage_uri(run, "label", "masks"), paths["annotations"], stage_uri(run, "label", PSEUDO_JSON)
    )
    return manifest.write_manifest(run, "label", fp, started, summary=summary, export=coco,
                                   pseudo_json=stage_uri(run, "label", PSEUDO_JSON), config=asdict(cfg.label))  # fmt: skip
