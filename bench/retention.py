"""Retention benchmark on the demo set: Mask R-CNN trained on EXITS / box-only / GT masks.

Usage:
    python bench/retention.py [--seed N] [--quick] [--exits-json P] [--box-only-json P]

Trains the same Mask R-CNN R50-FPN (``cpu_small`` profile, from scratch, same schedule and
seed) three times through :func:`exits.stage2.train_stage2` (Ray Train, CPU workers) on the
train split of the synthetic demo set, with masks from (a) the EXITS pseudo-label json,
(b) a box-only pseudo-label json, (c) the GT, and scores each on the GT val split with
COCOeval (segm AP). Retention = AP(a) / AP(c).

Without ``--box-only-json`` the box-only masks are the boxes themselves (box-as-mask);
without ``--exits-json`` the EXITS run is skipped and reported as null with a note. Both
jsons must be pseudo-label jsons of the demo train split written with the same
``--num-images/--image-size/--data-seed``.

The last stdout line is one JSON object:
``{"ap": {"exits": .., "box_only": .., "gt": ..}, "retention": .., ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from exits.data.synthetic import write_demo_dataset
from exits.evaluate import mask_ap, retention
from exits.stage2 import build_stage2_config, train_stage2
from exits.stage2.ray_train import PREDICTIONS_DIR

MODEL = "mask_rcnn_r50"
# ResNet depth → FPN input channels (a lighter backbone trains more steps in the budget)
FPN_IN_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512], 50: [256, 512, 1024, 2048]}
# full run: sized to finish the three trainings within 30 min on 2 cores
# (estimate: ~2 s/step for 2 workers x 2 images at 128 px on an idle 2-core machine)
FULL = dict(num_images=64, image_size=128, max_iters=200, checkpoint_interval=100)
QUICK = dict(num_images=12, image_size=96, max_iters=4, checkpoint_interval=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="training seed (same for all runs)")
    p.add_argument("--data-seed", type=int, default=0, help="demo-set seed")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (minutes)")
    p.add_argument("--exits-json", help="EXITS pseudo-label json of the demo train split")
    p.add_argument("--box-only-json", help="box-only pseudo-label json of the demo train split")
    p.add_argument("--num-images", type=int, help="demo images (train + val)")
    p.add_argument("--image-size", type=int, help="demo image side, px")
    p.add_argument("--max-iters", type=int, help="training iterations per run")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train CPU workers")
    p.add_argument("--depth", type=int, default=50, choices=sorted(FPN_IN_CHANNELS), help="ResNet")
    p.add_argument("--work-dir", help="where data and runs go (default: a temp dir)")
    return p.parse_args(argv)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def box_as_mask_json(gt_json: str, out_path: str) -> str:
    """Pseudo-label json whose masks are the GT boxes filled (the box-only floor)."""
    with open(gt_json) as f:
        data = json.load(f)
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        mask = np.zeros((h, w), np.uint8)
        mask[int(y) : int(np.ceil(y + bh)), int(x) : int(np.ceil(x + bw))] = 1
        ann["segmentation"] = _rle(mask)
        ann["area"] = float(mask.sum())
        ann["score"] = 1.0
    with open(out_path, "w") as f:
        json.dump(data, f)
    return out_path


def check_pseudo_json(pseudo_json: str, gt_json: str) -> None:
    """Fail fast when a pseudo-label json is not for the GT json's images."""
    with open(pseudo_json) as f, open(gt_json) as g:
        pseudo_ids = {im["id"] for im in json.load(f)["images"]}
        gt_ids = {im["id"] for im in json.load(g)["images"]}
    if pseudo_ids != gt_ids:
        raise ValueError(f"{pseudo_json}: images differ from the demo train split {gt_json}")


def train_and_score(
    train_json: str,
    data: dict[str, Any],
    run_root: str,
    name: str,
    args: argparse.Namespace,
    scale: dict,
) -> float:
    """Train Mask R-CNN on ``train_json``; COCOeval segm AP of its final val predictions."""
    cfg = build_stage2_config(
        MODEL,
        train_json=train_json,
        val_json=data["val_annotations"],
        images_root=data["images"],
        work_dir=os.path.join(run_root, "work", name),
        profile="cpu_small",
        max_iters=scale["max_iters"],
        dataset="demo",
        image_size=scale["image_size"],
        seed=args.seed,
        **{
            "default_hooks.checkpoint.interval": scale["checkpoint_interval"],
            "model.backbone.depth": args.depth,
            "model.neck.in_channels": FPN_IN_CHANNELS[args.depth],
        },
    )
    result = train_stage2(
        cfg,
        num_workers=args.num_workers,
        use_gpu=False,
        storage_path=run_root,
        name=name,
        resume=False,
    )
    preds = os.path.join(result.path, PREDICTIONS_DIR, f"val_iter_{scale['max_iters']}.segm.json")
    return mask_ap(data["val_annotations"], preds, iou_types=("segm",))["segm"]["AP"]


def _ratio(ap_pseudo: float | None, ap_gt: float | None) -> float | None:
    """Retention, or None (JSON null) when a run is missing or AP(gt) is 0."""
    if ap_pseudo is None or ap_gt is None:
        return None
    r = retention(ap_pseudo, ap_gt)
    return None if math.isnan(r) else r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    scale = dict(QUICK if args.quick else FULL)
    for key in ("num_images", "image_size", "max_iters"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    root = args.work_dir or tempfile.mkdtemp(prefix="exits-retention-")
    start = time.time()
    data = write_demo_dataset(
        os.path.join(root, "data"), scale["num_images"], scale["image_size"], seed=args.data_seed
    )
    gt_train = data["annotations"]
    box_json = args.box_only_json or box_as_mask_json(
        gt_train, os.path.join(root, "box_as_mask.json")
    )
    sources: dict[str, str | None] = {
        "exits": args.exits_json,
        "box_only": box_json,
        "gt": gt_train,
    }
    for path in (args.exits_json, args.box_only_json):
        if path:
            check_pseudo_json(path, gt_train)

    import ray

    ray.init(
        address="local", num_cpus=args.num_workers, include_dashboard=False, log_to_driver=False
    )
    runs = os.path.join(root, "runs")
    ap: dict[str, float | None] = {}
    for key, train_json in sources.items():
        ap[key] = (
            None
            if train_json is None
            else train_and_score(train_json, data, runs, key, args, scale)
        )
    ray.shutdown()

    notes = []
    if args.exits_json is None:
        notes.append("no --exits-json: EXITS run skipped (pseudo-labelling output not given)")
    if args.box_only_json is None:
        notes.append("box_only = box-as-mask (no --box-only-json)")
    out = {
        "ap": ap,
        "retention": _ratio(ap["exits"], ap["gt"]),
        "retention_box_only": _ratio(ap["box_only"], ap["gt"]),
        "seed": args.seed,
        "model": MODEL,
        "depth": args.depth,
        **scale,
        "num_workers": args.num_workers,
        "seconds": round(time.time() - start, 1),
        "note": "; ".join(notes) or None,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
