"""Stage 2 as a pipeline stage: build the mmdet config, train under Ray Train, evaluate.

The train json is the pseudo-label COCO json of stage 1c (from its manifest); val is the GT
json. Annotation files on s3 are copied to the run's local work dir first (mmdet reads local
files); images must be reachable on every worker (a shared mount or a local copy).
"""

from __future__ import annotations

import os
import tempfile

from exits import storage
from exits.config import Stage2Config

DATASET_KINDS = {"demo": "demo", "coco": "coco", "lvis": "lvis", "voc": "coco"}


def _local_json(uri: str, workdir: str, name: str) -> str:
    if not storage.is_s3(uri):
        return os.path.abspath(uri)
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.write(storage.read_bytes(uri))
    return path


def batch_override(cfg: Stage2Config) -> dict[str, int]:
    """mmengine override for the per-worker batch size (none: the profile's)."""
    return {"train_dataloader.batch_size": cfg.batch_size} if cfg.batch_size > 0 else {}


def train_and_evaluate(
    cfg: Stage2Config,
    dataset: str,
    *,
    train_json: str,
    val_json: str,
    images: str,
    val_images: str,
    work_uri: str,
) -> dict:
    """Train ``cfg.model`` on ``train_json`` and evaluate on ``val_json``; resumable.

    Returns:
        {"metrics": {...COCO/LVIS segm + bbox metrics...}, "checkpoint": URI of the Ray
        checkpoint, "train_json": ..., "model": ...}
    """
    from exits.stage2.configs import build_stage2_config
    from exits.stage2.driver import final_metrics, train_stage2

    workdir = tempfile.mkdtemp(prefix="exits-stage2-")
    train_local = _local_json(train_json, workdir, "train.json")
    val_local = _local_json(val_json, workdir, "val.json")
    mm_cfg = build_stage2_config(
        cfg.model, train_local, val_local, images, os.path.join(workdir, "mmdet"),
        profile=cfg.profile, max_iters=cfg.max_iters or None, dataset=DATASET_KINDS.get(dataset, "coco"),
        val_images_root=val_images, image_size=cfg.image_size or None, **batch_override(cfg),
    )  # fmt: skip
    result = train_stage2(
        mm_cfg, cfg.num_workers, cfg.use_gpu, storage.join(work_uri, "ray"), "train", resume=True,
        cpus_per_worker=cfg.cpus_per_worker, node_resource=cfg.node_resource,
        logical_gpus=cfg.logical_gpus, max_failures=cfg.max_failures,
    )  # fmt: skip
    if result.error is not None:
        raise RuntimeError(f"stage 2 failed: {result.error}")
    return {
        "metrics": final_metrics(result),
        "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
        "train_json": train_json,
        "model": cfg.model,
    }
