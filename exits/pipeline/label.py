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


def _check_counts(run: str, summary: dict) -> None:
    """Every instance and error row prepare counted (its manifest, written when the table was)
    is in the label outputs: checked against those counts, not against the table on disk."""
    from exits.label.commit import OutputMismatch

    counts = manifest.read_manifest(run, "prepare")["counts"]
    if (summary["masks"] + summary["errors"], summary["prepare_errors"]) != (
        counts["instances"], counts["errors"]):  # fmt: skip
        raise OutputMismatch(
            f"label: prepare counted {counts['instances']} instances and {counts['errors']} "
            f"error rows; the outputs hold {summary['masks']} masks + {summary['errors']} errors "
            f"and {summary['prepare_errors']} prepare errors"
        )


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
        shard_images=label_cfg.shard_images, max_image_bytes=cfg.data.max_image_bytes,
    )  # fmt: skip
    _check_counts(run, summary)
    coco = export_coco(
        stage_uri(run, "label", "masks"), paths["annotations"], stage_uri(run, "label", PSEUDO_JSON),
        min_score=cfg.label.min_score,
    )  # fmt: skip
    return manifest.write_manifest(run, "label", fp, started, summary=summary, export=coco,
                                   pseudo_json=stage_uri(run, "label", PSEUDO_JSON), config=asdict(cfg.label))  # fmt: skip
