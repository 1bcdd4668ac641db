"""Stage adapter ``prepare``: the instance tables (train, held-out) and their error tables."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict

from exits import manifest, storage
from exits.config import PipelineConfig
from exits.pipeline.common import stage_uri

log = logging.getLogger("exits.pipeline")
# instance tables are directories of Parquet parts (exits.data.prepare); errors are single files
PREPARE_ARTIFACTS = (
    "instances.parquet",
    "errors.parquet",
    "val_instances.parquet",
    "val_errors.parquet",
)


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
    from exits.data.validate import read_coco_json

    d = cfg.data
    coco = read_coco_json(d.annotations)
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


def _val_for_stage2(val_json: str, run: str, images: str | None = None, max_pixels: int | None = None) -> str:  # fmt: skip
    """The val json, or a copy under <run>/data that stage 2's mmdet loader and COCO metric can
    take: every annotation carries ``area`` (else stage 2 fails after every stage ran) and image
    entries prepare rejects (bad id/size, a file name outside the images root) are left out."""
    from exits.data.validate import drop_unusable_images, fill_missing_areas, read_coco_json

    data = read_coco_json(val_json)
    dropped = drop_unusable_images(data, max_pixels, images)
    filled = fill_missing_areas(data)
    if not (filled or dropped):
        return val_json
    out = storage.join(run, "data", "annotations", "val_for_stage2.json")
    storage.publish_bytes(out, json.dumps(data).encode())
    log.warning("val json %s: %d annotations without area filled, %d unusable image entries "
                "left out: %s", val_json, filled, dropped, out)  # fmt: skip
    return out


def run_prepare(cfg: PipelineConfig, run: str, fp: str) -> dict:
    from exits.data.prepare import prepare_instances

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
    out = {name: stage_uri(run, "prepare", name) for name in PREPARE_ARTIFACTS}
    c = prepare_instances(paths["annotations"], paths["images"], out["instances.parquet"],
                          out["errors.parquet"], shard_images=d.prepare_shard_images,
                          max_instances=d.max_instances, max_pixels=d.max_image_pixels,
                          max_bytes=d.max_image_bytes)  # fmt: skip
    counts = {"instances": c["instances"], "errors": c["errors"], "separated": c["separated"],
              "shards": c["shards"]}  # fmt: skip
    if paths["val_annotations"]:
        paths["val_annotations"] = _val_for_stage2(
            paths["val_annotations"], run, paths["val_images"], d.max_image_pixels
        )
        v = prepare_instances(paths["val_annotations"], paths["val_images"],
                              out["val_instances.parquet"], out["val_errors.parquet"],
                              shard_images=d.prepare_shard_images,
                              max_pixels=d.max_image_pixels, max_bytes=d.max_image_bytes)  # fmt: skip
        counts.update(val_instances=v["instances"], val_errors=v["errors"])
    log.info("prepare: %s", counts)
    return manifest.write_manifest(
        run, "prepare", fp, started, data=paths, counts=counts, config=asdict(d),
        outputs={"instances": "instances.parquet/ (Parquet parts)", "errors": "errors.parquet",
                 "val_instances": "val_instances.parquet/ (Parquet parts)",
                 "val_errors": "val_errors.parquet"},
    )  # fmt: skip
