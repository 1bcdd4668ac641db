"""Retention benchmark on the demo set: Mask R-CNN trained on EXITS / box-only / GT masks.

Usage:
    python bench/retention.py [--seed N | --seeds 0,1,2] [--score-images 200] [--quick]
                              [--profile P] [--exits-run DIR] [--box-only-run DIR]

1. Pseudo-labels the demo train split twice with the pipeline's own stages
   (``prepare`` → ``warmup`` → ``generator`` → ``label``, :func:`exits.pipeline.run_pipeline`):
   (a) EXITS (the profile ``make demo`` runs, ``demo_pretrained``; ``--profile demo``: the
   from-scratch one) and (b) the box-only ablation
   (``loss.objective=box_only``: MIL + CRF, no point/retrieval term). A run directory that
   already holds those stages with the same config (e.g. ``runs/demo`` after ``make demo``)
   is reused, not redone (manifest fingerprints). (a') ``exits_top90``: (a)'s json with the
   weakest 10 % of its masks by quality score left out (:func:`leave_out_weakest`).
2. Trains the demo profile's stage-2 model (Mask R-CNN R50-FPN, ``cpu_small``, from scratch)
   once per arm through :func:`exits.stage2.train_stage2` (Ray Train, CPU workers) with the
   same schedule and seed on (a), (a'), (b) and (c) the GT masks, and scores each with COCOeval
   (segm AP) on a scoring set: ``--score-images`` (default 200) synthetic GT images drawn
   with their own seed, never trained on (``0``: the pipeline's 24-image val split, whose AP
   moved by up to 0.037 between stage-2 seeds). Retention = AP(a) / AP(c).
3. With ``--seeds`` (≥ 3 for a verdict) every arm trains once per seed; the medians and
   spreads (max − min) over the seeds are reported, and the retention is quoted only when
   the instrument can tell: the GT arm's median beats the box arm's by more than either
   arm's spread (:func:`verdict`).

The last stdout line is one JSON object:
``{"ap": {"exits": .., "exits_top90": .., "box_only": .., "gt": ..}, "retention": ..,
"retention_top90": .., "ap_by_seed": ..,
"spread": .., "instrument": {"tells": .., ..}, ...}`` (``ap``: medians over the seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from typing import Any

from exits.config import load_config
from exits.data.synthetic import write_demo_dataset
from exits.evaluate import load_json, mask_ap, pseudo_label_miou, retention
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
RUNS = ("exits", "exits_top90", "box_only", "gt")
WEAKEST_FRACTION = 0.10  # exits_top90: the share of EXITS masks (lowest score) left out
# the pipeline profile whose data, labelling and stage-2 schedule the bench uses: by default
# the one `make demo` runs (--profile demo: the from-scratch tiny ViT)
FULL_CONFIG, QUICK_CONFIG = "demo_pretrained", "demo_quick"
SCORE_IMAGES = 200  # scoring-set size: 24 val images let the stage-2 seed move AP by 0.037
SCORE_SEED_OFFSET = 10_007  # scoring set seed = the profile's synthetic_seed + this
MIN_SEEDS_FOR_VERDICT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="stage-2 training seed (same for all runs)")
    p.add_argument(
        "--seeds",
        help="comma list of stage-2 seeds; every arm trains once per seed (overrides --seed)",
    )
    p.add_argument(
        "--score-images",
        type=int,
        help=f"synthetic GT images (own seed) to score on (default {SCORE_IMAGES}; --quick: 0); "
        "0: the pipeline's val split",
    )
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
    args = p.parse_args(argv)
    if args.score_images is None:  # its default depends on --quick
        args.score_images = 0 if args.quick else SCORE_IMAGES
    return args


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
    if args.score_images < 0:
        raise ValueError(f"--score-images must be >= 0, got {args.score_images}")
    seeds_of(args)
    return wanted


def seeds_of(args: argparse.Namespace) -> list[int]:
    """The stage-2 seeds: ``--seeds`` (distinct integers) or ``[--seed]``."""
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct seeds, got {args.seeds!r}")
    return seeds


def scoring_set(data: dict[str, Any], cfg: Any, root: str, num_images: int) -> dict[str, str]:
    """GT json + image folder the stage-2 arms are scored on: ``num_images`` synthetic images
    drawn with their own seed (never trained on), or the pipeline's val split for 0."""
    if num_images == 0:
        return {"val_annotations": data["val_annotations"], "val_images": data["val_images"]}
    out = write_demo_dataset(
        os.path.join(root, f"score-{num_images}"),
        num_images=num_images,
        image_size=cfg.data.synthetic_image_size,
        seed=cfg.data.synthetic_seed + SCORE_SEED_OFFSET,
        val_fraction=1.0,
    )
    return {"val_annotations": out["val_annotations"], "val_images": out["images"]}


def verdict(ap_by_seed: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Medians, spreads and whether the instrument can tell, from ``{arm: {seed: AP}}``.

    It can tell when the GT and box-only arms each ran at ≥ 3 seeds and the GT median beats
    the box-only median by more than the larger of the two arms' spreads (max − min over the
    seeds); only then is a retention (the median over seeds of AP_exits / AP_gt of the same
    seed) quoted.
    """
    median = {a: statistics.median(v.values()) for a, v in ap_by_seed.items() if v}
    spread = {a: max(v.values()) - min(v.values()) for a, v in ap_by_seed.items() if v}
    seeds = sorted(set().union(*(v.keys() for v in ap_by_seed.values())))
    per_seed = {
        sd: _ratio(ap_by_seed["exits"][sd], ap_by_seed["gt"][sd])
        for sd in seeds
        if sd in ap_by_seed.get("exits", {}) and sd in ap_by_seed.get("gt", {})
    }
    gap = noise = None
    if "gt" in median and "box_only" in median:
        gap = median["gt"] - median["box_only"]
        noise = max(spread["gt"], spread["box_only"])
    enough = all(len(ap_by_seed.get(a, {})) >= MIN_SEEDS_FOR_VERDICT for a in ("gt", "box_only"))
    tells = enough and gap is not None and gap > noise
    ratios = [r for r in per_seed.values() if r is not None]
    return {
        "median": median,
        "spread": spread,
        "retention_by_seed": per_seed,
        "instrument": {"seeds": len(seeds), "gt_minus_box": gap, "noise": noise, "tells": tells},
        "retention": statistics.median(ratios) if tells and ratios else None,
    }


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


def leave_out_weakest(pseudo_json: str, out_json: str, fraction: float = WEAKEST_FRACTION) -> dict:
    """Write ``pseudo_json`` without its ``floor(fraction * n)`` lowest-``score`` annotations
    (ties: lower id left out first) to ``out_json``; images and categories unchanged.

    Returns {"annotations" (kept), "left_out", "cut_score" (the lowest score kept, None when
    nothing is kept)}."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    with open(pseudo_json) as f:
        coco = json.load(f)
    anns = coco.get("annotations") or []
    missing = [a.get("id") for a in anns if not isinstance(a.get("score"), int | float)]
    if missing:
        raise ValueError(
            f"{pseudo_json}: {len(missing)} annotations without a score, e.g. id {missing[0]}"
        )
    ranked = sorted(anns, key=lambda a: (a["score"], a["id"]))
    drop = math.floor(fraction * len(anns) + 1e-9)
    kept = sorted(ranked[drop:], key=lambda a: a["id"])
    coco["annotations"] = kept
    with open(out_json, "w") as f:
        json.dump(coco, f)
    cut = min((a["score"] for a in kept), default=None)
    return {"annotations": len(kept), "left_out": drop, "cut_score": cut}


def kept_miou(gt_json: str, kept_json: str) -> dict[str, Any]:
    """Pseudo-label mIoU of the masks a cut kept, over their own GT instances only (the left-out
    ones are not scored 0 as :func:`pseudo_label_miou` would): ``{"miou", "count"}``."""
    gt, kept = load_json(gt_json), load_json(kept_json)
    ids = {a["id"] for a in kept["annotations"]}
    gt["annotations"] = [a for a in gt["annotations"] if a.get("id") in ids]
    return pseudo_label_miou(gt, kept)["all"]


def check_pseudo_json(pseudo_json: str, gt_json: str) -> None:
    """Fail fast when a pseudo-label json is not for the GT json's images."""
    with open(pseudo_json) as f, open(gt_json) as g:
        pseudo_ids = {im["id"] for im in json.load(f)["images"]}
        gt_ids = {im["id"] for im in json.load(g)["images"]}
    if pseudo_ids != gt_ids:
        raise ValueError(f"{pseudo_json}: images differ from the train split {gt_json}")


def train_and_score(
    train_json: str,
    data: dict[str, Any],
    score: dict[str, str],
    s2cfg: Any,
    runs: str,
    name: str,
    seed: int,
    args,
    scale: dict,
) -> dict[str, float]:
    """Train the stage-2 model on ``train_json`` (images of ``data``); COCOeval of its final
    predictions on the scoring set ``score`` (mmdet's end-of-training validation)."""
    start = time.time()
    cfg = build_stage2_config(
        s2cfg.model,
        train_json=train_json,
        val_json=score["val_annotations"],
        images_root=data["images"],
        val_images_root=score["val_images"],
        work_dir=os.path.join(runs, "work", name),
        profile=s2cfg.profile,
        max_iters=scale["max_iters"],
        dataset="demo",
        image_size=s2cfg.image_size or None,
        seed=seed,
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
    stats = mask_ap(score["val_annotations"], preds, iou_types=("segm",))["segm"]
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
    need = {"exits": "exits" in wanted or "exits_top90" in wanted, "box_only": "box_only" in wanted}
    labels = {
        kind: pseudo_labels(
            config,
            args.set,
            getattr(args, f"{kind}_run") or os.path.join(root, kind),
            kind,
        )
        for kind in ("exits", "box_only")
        if need[kind]
    }
    top90 = None
    if "exits_top90" in wanted:  # the EXITS json without its weakest 10 % by quality score
        path = os.path.join(root, "exits_top90.json")
        top90 = leave_out_weakest(labels["exits"]["pseudo_json"], path)
        top90["miou_kept"] = kept_miou(labels["exits"]["data"]["annotations"], path)["miou"]
        labels["exits_top90"] = {**labels["exits"], "pseudo_json": path}
    if labels:
        data = next(iter(labels.values()))["data"]
    else:  # GT only: the demo data of a prepare-only run
        data = run_pipeline(cfg, os.path.join(root, "gt"), stages=["prepare"])["prepare"]["data"]
    gt_train = data["annotations"]
    sources = {kind: labels[kind]["pseudo_json"] for kind in labels} | {"gt": gt_train}
    for kind in labels:
        check_pseudo_json(sources[kind], gt_train)
    score = scoring_set(data, cfg, root, args.score_images)
    runs = os.path.join(root, "stage2")
    seeds = seeds_of(args)
    scores: dict[str, dict[int, dict[str, float]]] = {k: {} for k in sources if k in wanted}
    for seed in seeds:
        for k in scores:
            name = k if len(seeds) == 1 else f"{k}-seed{seed}"
            scores[k][seed] = train_and_score(
                sources[k], data, score, s2cfg, runs, name, seed, args, scale
            )
            print(f"seed {seed} {k}: segm AP {scores[k][seed]['AP']:.4f}", flush=True)
    ray.shutdown()

    ap_by_seed = {k: {sd: v["AP"] for sd, v in by.items()} for k, by in scores.items()}
    judged = verdict(ap_by_seed)
    ap = {k: judged["median"].get(k) for k in RUNS}
    out = {
        "ap": ap,
        "retention": judged["retention"],  # null until the instrument can tell
        "retention_box_only": _ratio(ap["box_only"], ap["gt"]),
        "retention_top90": _ratio(ap["exits_top90"], ap["gt"]),  # medians; not a verdict
        "exits_top90": top90,
        "ap_by_seed": ap_by_seed,
        "spread": judged["spread"],
        "retention_by_seed": judged["retention_by_seed"],
        "instrument": judged["instrument"],
        "ap50": {k: statistics.median(v["AP50"] for v in by.values()) for k, by in scores.items()},
        "pseudo_label_miou": {
            k: pseudo_label_miou(gt_train, v["pseudo_json"])["all"]["miou"]
            for k, v in labels.items()
            if k != "exits_top90"  # its left-out masks would count as IoU 0
        },
        "seconds_label": {k: v["seconds"] for k, v in labels.items() if k != "exits_top90"},
        "seconds_stage2": {k: [v["seconds"] for v in by.values()] for k, by in scores.items()},
        "seeds": seeds,
        "score_images": args.score_images or "pipeline val split",
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
