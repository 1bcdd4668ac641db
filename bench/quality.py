"""Pseudo-label quality: EXITS vs its ablations and classical baselines, synthetic or real photos.

Usage: python bench/quality.py [--data demo|coco_mini] [--split heldout|tune] [--seed N]
                               [--images 160] [--epochs 12] [--workers 2] [--retrieval-only]

--data demo (default): the synthetic demo set (seeded), demo profile, 25 % of images held out.
--data coco_mini: 128 real COCO photos (../shared/data/coco_train128), coco_mini profile
  (pretrained DINOv2 ViT-S/14); --split heldout trains on 96 images and evaluates on the 32
  held-out ones; --split tune trains on 72 of the 96 and evaluates on the other 24 (for
  choosing settings without touching the 32).

Trains stage 1a/1b and evaluates pasted-back masks on the evaluation images: mIoU overall and
on the separated subset (GT mask with >= 2 components) for
  exits           the demo profile (configs/datasets/demo.yaml)
  box_only        same code, MAL's box-only objective (MIL + CRF)
  initial_points  EXITS supervised by the initial points only (no retrieval; paper Table 5 row 2)
  box             box-as-mask
  grabcut         OpenCV GrabCut initialised with the box and the 4 extreme points (5 iters)
plus retrieval precision/recall/AUC against GT for each similarity source, and for each
trained variant how well the labeller's per-mask quality score (``exits.inference.mask_score``)
ranks its masks by true IoU: Spearman(score, IoU) and the mean IoU of the top 90 % / 80 % of
masks by score beside that of all (``score`` in the JSON). Prints one JSON object as the last
stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exits import storage  # noqa: E402
from exits.checkpoints import load_model  # noqa: E402
from exits.config import load_config  # noqa: E402
from exits.data import rle  # noqa: E402
from exits.data.coco import write_table  # noqa: E402
from exits.data.crops import row_box  # noqa: E402
from exits.data.images import load_image  # noqa: E402
from exits.data.prepare import load_instances  # noqa: E402
from exits.data.split import TUNE_SALT, split_coco  # noqa: E402
from exits.data.synthetic import write_demo_dataset  # noqa: E402
from exits.evaluate.diagnostics import retrieval_stats  # noqa: E402
from exits.evaluate.quality import evaluate_generator, evaluate_masks  # noqa: E402
from exits.evaluate.weakest import score_ranking  # noqa: E402
from exits.inference import (  # noqa: E402
    box_pixels,
    masks_for_rows,
    score_candidates,
    threshold_and_score,
)
from exits.method.similarity import EXTRACTOR_SOURCES  # noqa: E402
from exits.model.generator import ATTENTION_BLOCKS  # noqa: E402
from exits.train.data import CropDataset, CropSpec  # noqa: E402
from exits.train.loops import loop_config  # noqa: E402
from exits.train.run import fit, publish_artifacts  # noqa: E402

GRABCUT_ITERS = 5
POINT_RADIUS = 2  # px: sure-foreground disc around each extreme point


def grabcut_mask(image: np.ndarray, row: dict) -> np.ndarray:
    box, pts = row_box(row)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.full((h, w), cv2.GC_BGD, np.uint8)
    mask[y0:y1, x0:x1] = cv2.GC_PR_FGD
    if pts is not None:
        for x, y in pts.astype(int):
            cv2.circle(mask, (int(x), int(y)), POINT_RADIUS, cv2.GC_FGD, -1)
        mask[mask == cv2.GC_FGD] = cv2.GC_FGD
        outside = np.ones((h, w), bool)
        outside[y0:y1, x0:x1] = False
        mask[outside] = cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(
            image[..., ::-1].copy(), mask, None, bgd, fgd, GRABCUT_ITERS, cv2.GC_INIT_WITH_MASK
        )
    except cv2.error:
        return (mask == cv2.GC_PR_FGD) | (mask == cv2.GC_FGD)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def baseline_masks(table, images: str, kind: str):
    for row in table.to_pylist():
        if kind == "box":
            box, _ = row_box(row)
            m = np.zeros((row["height"], row["width"]), np.float32)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            m[y0:y1, x0:x1] = 1
        else:
            m = grabcut_mask(load_image(os.path.join(images, row["file_name"])), row).astype(
                np.float32
            )
        yield row, m


def score_quality(model, table, images: str, size: int, enlarge: float, threshold: float) -> dict:
    """Spearman(score, IoU) and mean IoU of all / the top 90 % / 80 % of masks by score over the
    table's instances with a GT mask: the labeller's scoring rule (``threshold_and_score``) on
    the inference path's pasted probabilities, one pass; ``candidates``: the same figures for
    every candidate score (``exits.inference.score_candidates``)."""
    rows = sorted((r for r in table.to_pylist() if r.get("gt_segmentation")),
                  key=lambda r: r["file_name"])  # fmt: skip
    scores, ious, cands, per = [], [], {}, {"ann_id": [], "box_wh": [], "separated": []}
    for row, prob in masks_for_rows(model, rows, images, size, enlarge):
        box, points = row_box(row)
        mask, score = threshold_and_score(prob, box, threshold, points)
        r, c = box_pixels(box, prob.shape)
        local = None if points is None else points - [c.start, r.start]
        for k, v in score_candidates(prob[r, c], mask[r, c], local).items():
            cands.setdefault(k, []).append(v)
        scores.append(score)
        ious.append(rle.iou(rle.encode(mask), rle.from_json(row["gt_segmentation"])))
        per["ann_id"].append(int(row["ann_id"]))
        per["box_wh"].append([c.stop - c.start, r.stop - r.start])
        per["separated"].append(bool(row.get("separated")))
    iou = np.asarray(ious)
    ranking = score_ranking(np.asarray(scores), iou)
    return {**{k: round(v, 4) for k, v in ranking.items()}, "count": len(scores),
            "candidates": {k: {m: round(x, 4) for m, x in score_ranking(np.asarray(v), iou).items()}
                           for k, v in cands.items()},
            # per instance, for offline analysis of other scores (written beside the run)
            "per_instance": {**per, "iou": ious, "score": scores, **cands}}  # fmt: skip


SOURCES = ("spatial", "bilateral", "attention", "attention_x_bilateral", "tokens",
           "tokens_x_bilateral")  # fmt: skip


def real_photo_split(cfg, split: str, out: str) -> dict:
    """Training / evaluation jsons of a real-photo profile (exits.data.split, by image id):
    heldout = (train part, held-out part); tune = a second split inside the train part."""
    coco = json.loads(storage.read_bytes(cfg.data.annotations))
    train, held = split_coco(coco, cfg.data.holdout_images, cfg.data.holdout_salt)
    if split == "tune":
        train, held = split_coco(train, len(train["images"]) // 4, TUNE_SALT)
    os.makedirs(out, exist_ok=True)
    paths = {"images": cfg.data.images}
    for key, part in (("annotations", train), ("val_annotations", held)):
        paths[key] = os.path.join(out, f"{key}.json")
        with open(paths[key], "w") as f:
            json.dump(part, f)
    return paths


def summarise(res: dict) -> dict:
    return {"all": round(res["all"]["miou"], 4), "separated": round(res["separated"]["miou"], 4),
            "count": res["all"]["count"], "separated_count": res["separated"]["count"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("demo", "coco_mini"), default="demo")
    p.add_argument("--split", choices=("heldout", "tune"), default="heldout")
    p.add_argument("--profile", default=None, help="config profile (default: the --data name)")
    p.add_argument("--retrieval-only", action="store_true", help="stop after the retrieval table")
    p.add_argument("--no-retrieval", action="store_true", help="skip the retrieval table")
    p.add_argument(
        "--variants", default="exits,box_only,initial_points", help="trained variants to run"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=160, help="demo images (25%% held out)")
    p.add_argument("--epochs", type=int, default=None, help="generator epochs (default: demo.yaml)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: profile)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override for all runs"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    t0 = time.time()
    cfg = load_config(args.profile or args.data, args.overrides)
    if args.workers:
        cfg.warmup.num_workers = cfg.generator.num_workers = args.workers
    workers = max(cfg.warmup.num_workers, cfg.generator.num_workers)
    cfg.warmup.seed = cfg.generator.seed = args.seed
    if args.epochs:
        cfg.generator.epochs = args.epochs
    out = args.out or tempfile.mkdtemp(prefix="exits-quality-")
    if args.data == "demo":
        data = write_demo_dataset(
            os.path.join(out, "data"), args.images, cfg.data.synthetic_image_size, args.seed
        )
    else:
        data = real_photo_split(cfg, args.split, os.path.join(out, "data"))
    train, _ = load_instances(data["annotations"], data["images"])
    val, _ = load_instances(data["val_annotations"], data["images"])
    write_table(train, os.path.join(out, "instances.parquet"))
    ray.init(
        address="local",
        num_cpus=max(2, workers),
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
    )
    timings = {}

    def train_stage(stage: str, name: str, c, extractor=None) -> str:
        t = time.time()
        tc = c.warmup if stage == "warmup" else c.generator
        loop = loop_config(stage, os.path.join(out, "instances.parquet"), data["images"], c.crop, c.model, c.retrieval,
                           c.loss, tc, extractor_checkpoint=extractor)  # fmt: skip
        res = fit(loop, tc, os.path.join(out, name, "ray"))
        if res.error is not None:
            raise RuntimeError(f"{name} failed: {res.error}")
        publish_artifacts(res, os.path.join(out, name))
        timings[name] = round(time.time() - t, 1)
        return os.path.join(out, name, "model.pt")

    extractor_uri = train_stage("warmup", "warmup", cfg)
    extractor, _ = load_model(extractor_uri)
    extractor.freeze()

    # retrieval quality of each similarity source on held-out crops
    spec = CropSpec(size=cfg.crop.size, train=False, inference_enlarge=cfg.crop.inference_enlarge)
    loader = torch.utils.data.DataLoader(CropDataset(val, data["images"], spec), batch_size=32)
    retrieval = {}
    t = time.time()
    paper_block = ATTENTION_BLOCKS.get(cfg.model.generator, extractor.attention_block)
    blocks = sorted({paper_block, extractor.attention_block, extractor.encoder.depth - 1})
    for source in () if args.no_retrieval else SOURCES:
        for block in blocks if "attention" in source else [extractor.attention_block]:
            extractor.attention_block = block
            for rule in ("absolute", "relative"):
                rc = replace(cfg.retrieval, similarity=source, threshold_rule=rule)
                st = retrieval_stats(loader, extractor.grid, rc, extractor=extractor)
                key = f"{source}@{block}/{rule}" if "attention" in source else f"{source}/{rule}"
                retrieval[key] = {k: round(v, 4) for k, v in st.items()}
    extractor.attention_block = (
        blocks[0] if cfg.model.attention_block is None else cfg.model.attention_block
    )
    timings["retrieval_table"] = round(time.time() - t, 1)
    if args.retrieval_only:
        ray.shutdown()
        print(json.dumps({"retrieval": retrieval, "data": args.data, "split": args.split,
                          "val_instances": val.num_rows, "timings": timings}))  # fmt: skip
        return

    all_variants = {
        "exits": cfg,
        "box_only": replace(cfg, loss=replace(cfg.loss, objective="box_only")),
        "initial_points": replace(cfg, retrieval=replace(cfg.retrieval, enabled=False)),
    }
    variants = {k: all_variants[k] for k in args.variants.split(",")}
    miou, heldout, score = {}, {}, {}
    for name, c in variants.items():
        ext = extractor_uri if c.retrieval.similarity in EXTRACTOR_SOURCES else None
        model, _ = load_model(train_stage("generator", name, c, ext))
        res = evaluate_generator(
            model, val, data["images"], c.crop.size, c.crop.inference_enlarge, c.label.threshold
        )
        miou[name], heldout[name] = summarise(res), res
        t = time.time()
        score[name] = score_quality(model, val, data["images"], c.crop.size,
                                    c.crop.inference_enlarge, c.label.threshold)  # fmt: skip
        per_instance = os.path.join(out, f"score_{name}.json")
        with open(per_instance, "w") as f:
            json.dump(score[name].pop("per_instance"), f)
        score[name]["per_instance"] = per_instance
        timings[f"score_{name}"] = round(time.time() - t, 1)
    for kind in ("box", "grabcut"):
        t = time.time()
        miou[kind] = summarise(evaluate_masks(val, baseline_masks(val, data["images"], kind), 0.5))
        timings[kind] = round(time.time() - t, 1)
    ray.shutdown()
    result = {
        "miou": miou,
        "score": score,  # per variant: spearman, miou_all, miou_top90, miou_top80, count
        "retrieval": retrieval,
        "seed": args.seed,
        "data": args.data,
        "profile": args.profile or args.data,
        "split": args.split,
        "images": args.images if args.data == "demo" else None,
        "train_instances": train.num_rows,
        "val_instances": val.num_rows,
        "val_separated": int(sum(bool(s) for s in val["separated"].to_pylist())),
        "config": {
            "generator": cfg.model.generator,
            "trainable_blocks": cfg.model.trainable_blocks,
            "similarity": cfg.retrieval.similarity,
            "threshold_rule": cfg.retrieval.threshold_rule,
            "generator_epochs": cfg.generator.epochs,
            "balanced_bce": cfg.loss.balanced_bce,
            "dropout": cfg.retrieval.dropout,
        },  # fmt: skip
        "seconds": round(time.time() - t0, 1),
        "timings": timings,
        "out": out,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
