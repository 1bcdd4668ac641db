"""Stage 1c driver: ``label_instances`` plans the shards, skips the committed ones, runs the Ray
Data pipeline over the rest, commits each finished shard and writes the manifest last."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from exits import manifest, storage
from exits.config import CropConfig, LabelConfig
from exits.data.coco import ERROR_SCHEMA, write_table
from exits.label.commit import ShardCommitter, committed_shards, verify_outputs
from exits.label.plan import (
    PLAN,
    PREPARE_ERRORS,
    STAGE,
    describe_checkpoint,
    expected_ids,
    fingerprint,
    image_blocks,
    scan_input,
)
from exits.label.stages import build_dataset, crop_task_memory
from exits.model.generator import OUTPUT_STRIDE
from exits.progress import Progress

log = logging.getLogger(__name__)
progress_log = logging.getLogger("exits.progress")


# instances per pipeline row: an image with more is split (plan.image_rows), so results of an
# image holding thousands of annotations reach the driver (and the progress line) every few
# batches instead of all at the end (10,000 on one image: first line after ~9 min before)
ROW_BATCHES = 4


class InjectedFault(RuntimeError):
    """``LabelConfig.fail_after_batches = K > 0``: the driver stops the run after consuming K
    result batches (shards completed by then are committed), like a job killed part way."""


def _validate(crop: CropConfig, cfg: LabelConfig) -> None:
    if not 0.0 < cfg.threshold < 1.0:
        raise ValueError(f"LabelConfig.threshold must be in (0, 1), got {cfg.threshold}")
    if cfg.num_actors < 1 or cfg.batch_size < 1 or cfg.images_per_block < 1:
        raise ValueError("LabelConfig num_actors, batch_size, images_per_block must be >= 1")
    if cfg.use_gpu and cfg.gpus_per_actor <= 0:
        raise ValueError("LabelConfig.use_gpu needs gpus_per_actor > 0")
    if crop.size % OUTPUT_STRIDE:
        raise ValueError(f"crop size {crop.size} is not a multiple of {OUTPUT_STRIDE}")


def local_image_stats(file_names: list[str], images: str) -> str | None:
    """Digest of (file name, size, mtime) of every image under a local root (one ``stat``
    each; None on s3, where it would cost a request per image): part of the plan's
    fingerprint, so an image replaced in place is never silently reused."""
    if storage.is_s3(images) or "://" in images:
        return None
    h = hashlib.sha256()
    for name in sorted(set(file_names)):
        try:
            st = os.stat(os.path.join(images, name))
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # a missing file becomes an error row later; its absence is hashed
            h.update(f"{name}\0-\n".encode())
    return h.hexdigest()[:16]


def _put_blocks(instances, scan, done: set[int], crop: CropConfig, cfg: LabelConfig,
                shard_images: int) -> tuple[list, int]:  # fmt: skip
    """The image-row blocks of the shards to do, put into the object store one at a time (the
    driver holds one part of the table, then only the references), and the decode task's
    memory request (:func:`crop_task_memory` over every block)."""
    import ray

    refs, memory = [], 0
    for block in image_blocks(instances, scan.image_ids, shard_images, done,
                              cfg.images_per_block, cfg.batch_size * ROW_BATCHES):  # fmt: skip
        memory = max(memory, crop_task_memory(block, crop.size, cfg.images_per_block))
        refs.append(ray.put(block))
    return refs, memory


def label_instances(
    instances: pa.Table | str,
    images: str,
    checkpoint: str,
    output: str,
    crop: CropConfig,
    cfg: LabelConfig,
    *,
    upstream_errors: pa.Table | None = None,
    shard_images: int | None = None,
    max_image_bytes: int | None = None,
) -> dict[str, Any]:
    """Pseudo-label every instance once; resumable; returns a summary dict.

    Args:
        instances: instance table (exits.data.coco schema) or its Parquet URI.
        images: URI prefix the instances' ``file_name`` is relative to.
        checkpoint: generator checkpoint URI (exits.checkpoints format).
        output: run directory URI; results go to ``<output>/label/``.
        crop: crop size S (= the generator's input size) and inference enlargement.
        cfg: batch/pool sizes, devices, threshold, fault injection.
        upstream_errors: error rows of earlier stages (e.g. prepare), carried into
            ``errors/prepare.parquet`` so the errors output is complete.
        shard_images: images per output shard (commit/resume unit); None: ``cfg.shard_images``.
        max_image_bytes: image files larger than this are error rows (``data.max_image_bytes``;
            None: its default).

    Returns:
        {"instances", "masks", "errors", "prepare_errors", "empty_masks", "crops", "shards",
         "shards_skipped", "shards_written", "seconds", "first_result_s" (actor start-up and
         pipeline fill), "first_result_rows" (rows of that first result batch), "commit_s"
         (driver time committing), "crops_per_s" (this run's crops / seconds), "generator",
         "output"}
    """
    _validate(crop, cfg)
    if shard_images is None:
        shard_images = cfg.shard_images
    started = time.time()
    scan = scan_input(instances, shard_images)  # ids and shards only; the table stays on disk
    ckpt = describe_checkpoint(checkpoint)
    if ckpt["kind"] != "generator":
        raise ValueError(f"{checkpoint} is a {ckpt['kind']!r} checkpoint, not a generator")
    if ckpt["input_size"] != crop.size:
        raise ValueError(f"crop size {crop.size} != generator input size {ckpt['input_size']}")
    gen_id = ckpt["id"]
    fp = fingerprint(
        scan.digest, generator=gen_id, images=images, size=crop.size,
        enlarge=crop.inference_enlarge, threshold=cfg.threshold, shard_images=shard_images,
        image_files=local_image_stats(scan.file_names, images),
    )  # fmt: skip
    num_shards = scan.num_shards
    stage_dir = manifest.stage_uri(output, STAGE)
    plan_uri = storage.join(stage_dir, PLAN)
    if storage.exists(plan_uri):
        plan = storage.read_json(plan_uri)
        if plan.get("fingerprint") != fp:
            raise ValueError(
                f"{stage_dir} holds a labelling run with other inputs/settings "
                f"(plan {plan.get('fingerprint')} != {fp}); use a new output or delete it"
            )
    else:
        storage.write_json(plan_uri, {"fingerprint": fp, "num_shards": num_shards,
                                      "shard_images": shard_images, "instances": len(scan.ann_id)})  # fmt: skip
    if upstream_errors is not None:
        write_table(
            upstream_errors.cast(ERROR_SCHEMA), storage.join(stage_dir, "errors", PREPARE_ERRORS)
        )
    if manifest.is_done(output, STAGE, fp):
        log.info("label: %s already done (fingerprint %s)", stage_dir, fp)
        return {**manifest.read_manifest(output, STAGE)["summary"], "cached": True}

    done = committed_shards(output)
    todo = ~np.isin(scan.shard, sorted(done))
    committer = ShardCommitter(output, expected_ids(scan.shard[todo], scan.ann_id[todo]))
    t0, first_result, first_rows, commit_s = time.time(), None, 0, 0.0
    progress = Progress("1c", int(todo.sum()), unit="rows", rate_unit="crops/s")
    if todo.any():
        blocks, task_memory = _put_blocks(instances, scan, done, crop, cfg, shard_images)
        ds = build_dataset(
            blocks,
            task_memory=task_memory,
            images=images,
            checkpoint=checkpoint,
            generator_id=gen_id,
            crop=crop,
            cfg=cfg,
            max_image_bytes=max_image_bytes,
        )
        # prefetch_batches=0: with prefetching, Ray Data hands block k over only once block
        # k+1 exists (iter_batches.prefetch_batches_locally), a whole model task late; the
        # driver's commit is cheap, so nothing is lost by taking each block as it lands
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
        for n, batch in enumerate(batches, 1):
            if first_result is None:
                first_result, first_rows = time.time() - t0, batch.num_rows
            t_commit = time.time()
            committer.add(batch)
            commit_s += time.time() - t_commit
            line = progress.update(progress.done + batch.num_rows)
            if line:
                progress_log.info(line)
            if 0 < cfg.fail_after_batches <= n:
                raise InjectedFault(f"fault injection: stopping after {n} result batches")
    committer.check_complete()
    progress_log.info(progress.summary())
    seconds = time.time() - t0
    counts = verify_outputs(output, scan.ann_id, upstream_errors)
    summary = {
        **counts,  # masks, errors, empty_masks: over all shards, also those of earlier runs
        "crops": committer.counts["crops"],
        "shards": num_shards,
        "shards_skipped": len(done & set(range(num_shards))),
        "shards_written": len(committer.committed),
        "seconds": round(seconds, 3),
        "first_result_s": round(first_result, 3) if first_result is not None else None,
        "first_result_rows": first_rows,
        "commit_s": round(commit_s, 3),  # driver time spent committing result batches
        "crops_per_s": round(committer.counts["crops"] / seconds, 2) if seconds > 0 else 0.0,
        "generator": gen_id,
        "output": stage_dir,
    }
    manifest.write_manifest(
        output, STAGE, fp, started,
        inputs={"instances": instances if isinstance(instances, str) else "<table>",
                "images": images, "checkpoint": checkpoint},
        config={"crop": vars(crop), "label": vars(cfg), "shard_images": shard_images},
        summary=summary,
    )  # fmt: skip
    return summary
