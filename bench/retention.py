"""Retention benchmark on the demo set: Mask R-CNN trained on EXITS / box-only / GT masks.

Usage:
    python bench/retention.py [--seed N] [--quick] [--profile P] [--exits-run DIR]
                              [--box-only-run DIR]

1. Pseudo-labels the demo train split twice with the pipeline's own stages
   (``prepare`` → ``warmup`` → ``generator`` → ``label``, :func:`exits.pipeline.run_pipeline`):
   (a) EXITS (the profile ``make demo`` runs, ``demo_pretrained``; ``--profile demo``: the
   from-scratch one) and (b) the box-only ablation
   (``loss.objective=box_only``: MIL + CRF, no point/retrieval term). A run directory that
   already holds those stages with the same config (e.g. ``runs/demo`` after ``make demo``)
   is reused, not redone (manifest fingerprints).
2. Trains the demo profile's stage-2 model (Mask R-CNN R50-FPN, ``cpu_small``, from scratch)
   three times through :func:`exits.stage2.train_stage2` (Ray Train, CPU workers) with the
   same schedule and seed on (a), (b) and (c) the GT masks, and scores each on the GT val
   split with COCOeval (segm AP). Retention = AP(a) / AP(c).

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

from exits.config import load_config
from exits.evaluate import mask_ap, pseudo_label_miou, retention
from exits.pipeline import run_pipeline
from exits.stage2 import build_stage2_config, train_stage2
from exits.stage2.report_hook import PREDICTIONS_DIR
from exits.stage2.train_eval import batch_override

LABEL_STAGES = {
    "exits": ["prepare", "warmup", "generator", "label"],
    # box-only needs no warm-up: its generator loss has no retrieval term
    "box_only": ["prepare", "generator", "label"],
}
OBJECTIVE_OVERRIDES = {"exits": [], "box_only": ["loss.objective=box_only"]}
# ResNet depth → FPN input channels
FPN_IN_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512], 50: [256, 512, 1024, 2048]}
RUNS = ("exits", "box_only", "gt")
# the pipeline profile whose data, labelling and stage-2 schedule the bench uses: by default
# the one `make demo` runs (--profile demo: the from-scratch tiny ViT)
FULL_CONFIG, QUICK_CONFIG = "demo_pretrained", "demo_quick"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="stage-2 training seed (same for all runs)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (demo_quick, 4 iterations)")
    p.add_argument("--profile", default=FULL_CONFIG, help="pipeline profile (default: make demo's)")
    p.add_argument(
        "--exits-run",
        help="pipeline run dir for the EXITS pseudo-labels (reused when its labelling stages "
        "match the config; with --set they are redone there and overwrite that run's stages)",
    )
    p.add_argument("--box-only-run", help="pipeline run dir for the box-only pseudo-labels")
    p.add_argument("--set", action="append", default=[], help="pipeline config override k=v")
    p.add_argument("--max-iters", type=int, help="stage-2 iterations per run (default: config's)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (default: the config's)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--depth", type=int, default=50, choices=sorted(FPN_IN_CHANNELS), help="ResNet")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of runs from {RUNS}")
    p.add_argument("--work-dir", help="where runs go (default: a temp dir)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace, s2cfg: Any) -> list[str]:
    """The runs to train; fail fast on unknown run names and on workers that cannot fit."""
    wanted = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(wanted) - set(RUNS))
    if unknown or not wanted:
        raise ValueError(f"--runs: unknown {unknown or wanted}; choose from {RUNS}")
    need = (args.num_workers or s2cfg.num_workers) * s2cfg.cpus_per_worker
    if need > args.num_cpus:
        raise ValueError(
            f"stage 2 needs {need} CPUs (workers x stage2.cpus_per_worker) but the local Ray "
            f"instance has --num-cpus {args.num_cpus}: Ray Train would wait forever"
        )
    return wanted


def pseudo_labels(config: str, overrides: list[str], run_dir: str, kind: str) -> dict[str, Any]:
    """Run the pipeline's labelling stages for ``kind`` in ``run_dir``; paths + timing."""
    cfg = load_config(config, overrides + OBJECTIVE_OVERRIDES[kind])
    start = time.time()
    res = run_pipeline(cfg, run_dir, stages=LABEL_STAGES[kind])
    return {
        "pseudo_json": res["label"]["pseudo_json"],
        "data": res["prepare"]["data"],
        "seconds": round(time.time() - start, 1),
    }


def check_pseudo_json(pseudo_json: str, gt_json: str) -> None:
    """Fail fast when a pseudo-label json is not for the GT json's images."""
    with open(pseudo_json) as f, open(gt_json) as g:
        pseudo_ids = {im["id"] for im in json.load(f)["images"]}
        gt_ids = {im["id"] for im in json.load(g)["images"]}
    if pseudo_ids != gt_ids:
        raise ValueError(f"{pseudo_json}: images differ from the train split {gt_json}")


def train_and_score(
    train_json: str, data: dict[str, Any], s2cfg: Any, runs: str, name: str, args, scale: dict
) -> dict[str, float]:
    """Train the stage-2 model on ``train_json``; COCOeval of its final val predictions."""
    start = time.time()
    cfg = build_stage2_config(
        s2cfg.model,
        train_json=train_json,
        val_json=data["val_annotations"],
        images_root=data["images"],
        val_images_root=data["val_images"],
        work_dir=os.path.join(runs, "work", name),
        profile=s2cfg.profile,
        max_iters=scale["max_iters"],
        dataset="demo",
        image_size=s2cfg.image_size or None,
        seed=args.seed,
        **{
            "default_hooks.checkpoint.interval": scale["checkpoint_interval"],
            "model.backbone.depth": args.depth,
            "model.neck.in_channels": FPN_IN_CHANNELS[args.depth],
            **batch_override(s2cfg),
        },
    )
    result = train_stage2(
        cfg,
        num_workers=args.num_workers or s2cfg.num_workers,
        use_gpu=False,
        storage_path=runs,
        name=name,
        resume=False,
        cpus_per_worker=s2cfg.cpus_per_worker,
    )
    if result.error is not None:
        raise RuntimeError(f"stage-2 run {name} failed: {result.error}")
    preds = os.path.join(result.path, PREDICTIONS_DIR, f"val_iter_{scale['max_iters']}.segm.json")
    stats = mask_ap(data["val_annotations"], preds, iou_types=("segm",))["segm"]
    return {"AP": stats["AP"], "AP50": stats["AP50"], "seconds": round(time.time() - start, 1)}


def _ratio(ap_pseudo: float | None, ap_gt: float | None) -> float | None:
    """Retention, or None (JSON null) when a run is missing or AP(gt) is 0."""
    if ap_pseudo is None or ap_gt is None:
        return None
    r = retention(ap_pseudo, ap_gt)
    return None if math.isnan(r) else r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = QUICK_CONFIG if args.quick else args.profile
    cfg = load_config(config, args.set)
    s2cfg = cfg.stage2
    wanted = validate(args, s2cfg)
    max_iters = args.max_iters or s2cfg.max_iters
    scale = dict(config=config, max_iters=max_iters, checkpoint_interval=max(1, max_iters // 2))
    root = args.work_dir or tempfile.mkdtemp(prefix="exits-retention-")
    start = time.time()

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    labels = {
        kind: pseudo_labels(
            config,
            args.set,
            getattr(args, f"{kind}_run") or os.path.join(root, kind),
            kind,
        )
        for kind in ("exits", "box_only")
        if kind in wanted
    }
    if labels:
        data = next(iter(labels.values()))["data"]
    else:  # GT only: the demo data of a prepare-only run
        data = run_pipeline(cfg, os.path.join(root, "gt"), stages=["prepare"])["prepare"]["data"]
    gt_train = data["annotations"]
    sources = {kind: labels[kind]["pseudo_json"] for kind in labels} | {"gt": gt_train}
    for kind in labels:
        check_pseudo_json(sources[kind], gt_train)
    runs = os.path.join(root, "stage2")
    scores = {
        k: train_and_score(src, data, s2cfg, runs, k, args, scale)
        for k, src in sources.items()
        if k in wanted
    }
    ray.shutdown()

    ap = {k: (scores[k]["AP"] if k in scores else None) for k in ("exits", "box_only", "gt")}
    out = {
        "ap": ap,
        "retention": _ratio(ap["exits"], ap["gt"]),
        "retention_box_only": _ratio(ap["box_only"], ap["gt"]),
        "ap50": {k: v["AP50"] for k, v in scores.items()},
        "pseudo_label_miou": {
            k: pseudo_label_miou(gt_train, v["pseudo_json"])["all"]["miou"]
            for k, v in labels.items()
        },
        "seconds_label": {k: v["seconds"] for k, v in labels.items()},
        "seconds_stage2": {k: v["seconds"] for k, v in scores.items()},
        "seed": args.seed,
        "model": s2cfg.model,
        "depth": args.depth,
        **scale,
        "num_workers": args.num_workers or s2cfg.num_workers,
        "cpus_per_worker": s2cfg.cpus_per_worker,
        "batch_size": s2cfg.batch_size,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
