"""Pseudo-label a dataset in bulk with a trained generator (stage 1c on its own).

Usage::

    # local Ray, CPU
    python jobs/pseudo_label.py --checkpoint runs/demo/generator/model.pt \\
        --annotations demo_data/annotations/instances_train.json --images demo_data/images \\
        --output runs/label-demo
    # on a cluster (RAY_ADDRESS is set by `ray job submit`), GPUs, S3
    ray job submit --working-dir . -- python jobs/pseudo_label.py \\
        --checkpoint s3://bucket/gen.pt --annotations s3://bucket/lvis_v1_train.json \\
        --images s3://bucket/coco/ --output s3://bucket/runs/lvis-labels \\
        --config configs/label/gpu.yaml --num-actors 8

The annotations may carry ``extreme_points`` per annotation (or GT masks/polygons they are
derived from); annotations with boxes only are cropped from their box and flagged
``supervision="box"``. The instance table goes to ``<output>/prepare/`` (Parquet parts, written by
Ray Data tasks). Outputs under ``<output>/label/``: ``masks/`` and ``errors/`` Parquet
shards, ``manifest.json`` and the COCO json ``pseudo_coco.json`` (the pipeline's name). Re-running the same command
resumes: finished shards are kept, the rest is labelled. Prints a summary line and, last, a
JSON summary. The output directory has one owner at a time (``<output>/lease.json``,
:mod:`exits.lease`): a second job on it is refused while the first runs; ``--take-over`` takes
the lease of a dead run before it expires.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exits import manifest, storage  # noqa: E402
from exits.config import PipelineConfig, load_config, validate_config  # noqa: E402
from exits.data.coco import read_table  # noqa: E402
from exits.data.prepare import prepare_instances  # noqa: E402
from exits.label import (  # noqa: E402
    PSEUDO_JSON,
    STAGE,
    describe_checkpoint,
    export_coco,
    label_instances,
)
from exits.label.commit import OutputMismatch  # noqa: E402
from exits.lease import OutputLease  # noqa: E402
from exits.pipeline.preflight import check_cluster  # noqa: E402

EXPORT_NAME = PSEUDO_JSON  # pseudo_coco.json, as in a pipeline run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="generator checkpoint URI")
    p.add_argument("--annotations", required=True, help="COCO-format json URI")
    p.add_argument("--images", required=True, help="URI prefix of the images")
    p.add_argument("--output", required=True, help="run directory URI (local or s3://)")
    p.add_argument("--config", help="YAML with label:/crop: sections (e.g. configs/label/gpu.yaml)")
    p.add_argument("--num-actors", type=int, help="model actors (1 GPU each with --use-gpu)")
    p.add_argument("--batch-size", type=int, help="crops per model batch")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor, bf16 autocast")
    p.add_argument("--threshold", type=float, help="mask probability threshold")
    p.add_argument("--crop-size", type=int, help="S (default: the generator's input size)")
    p.add_argument("--verbose", action="store_true", help="Ray's own output on the console too")
    p.add_argument("--take-over", action="store_true",
                   help="take the output's lease from another run (only when that run is dead)")  # fmt: skip
    p.add_argument(
        "overrides", nargs="*", help="extra config overrides, e.g. label.images_per_block=16"
    )
    return p.parse_args(argv)


def check_checkpoint(args: argparse.Namespace) -> dict:
    """The generator checkpoint's description, checked before Ray starts: a generator with
    sane builder arguments (exits.checkpoints.check_checkpoint); raises ValueError."""
    info = describe_checkpoint(args.checkpoint)
    if info["kind"] != "generator":
        raise ValueError(f"{args.checkpoint} is a {info['kind']!r} checkpoint, not a generator")
    return info


def build_config(args: argparse.Namespace, checkpoint: dict | None = None) -> PipelineConfig:
    """Config file (or the defaults), then key=value overrides, then the explicit flags (flags
    win). One config path, :func:`exits.config.load_config`: ``--use-gpu`` is ``device=cuda``.
    ``checkpoint``: :func:`check_checkpoint`'s result (else the checkpoint is read when its
    input size is needed)."""
    cfg = load_config(args.config, [*args.overrides, *(["device=cuda"] if args.use_gpu else [])])
    if args.crop_size:
        cfg.crop.size = args.crop_size
    elif not args.config and not any(
        o.split("=")[0].strip() == "crop.size" for o in args.overrides
    ):
        # no config file and no crop.size override: crops at the generator's input size
        cfg.crop.size = (checkpoint or describe_checkpoint(args.checkpoint))["input_size"]
    if args.num_actors:
        cfg.label.num_actors = args.num_actors
    if args.batch_size:
        cfg.label.batch_size = args.batch_size
    if args.threshold is not None:
        cfg.label.threshold = args.threshold
    return validate_config(cfg)  # the flags too: fail before Ray starts


def main(argv: list[str] | None = None) -> dict:
    from contextlib import nullcontext

    args = parse_args(argv)
    ckpt = check_checkpoint(args)  # kind and builder arguments: before Ray starts
    cfg = build_config(args, ckpt)
    if ckpt["input_size"] != cfg.crop.size:
        raise ValueError(f"crop size {cfg.crop.size} != generator input size {ckpt['input_size']}")
    import ray

    from exits.console import run_console

    # joins the cluster when RAY_ADDRESS is set (ray job submit), else a quiet local Ray
    console = (
        nullcontext() if ray.is_initialized() else run_console(args.output, verbose=args.verbose)
    )
    # one owner per output directory, taken before anything is written there
    with OutputLease(args.output, take_over=args.take_over):
        return _run(args, cfg, console)


def _run(args: argparse.Namespace, cfg: PipelineConfig, console) -> dict:
    with console:
        check_cluster(cfg, ["label"])  # requests no node type can hold fail now, not hang
        # prepare as Ray Data tasks over image shards; images are decoded once, in the label
        # stage (check_files=False); the instance table is a directory of Parquet parts
        instances = manifest.stage_uri(args.output, "prepare", "instances.parquet")
        errors = manifest.stage_uri(args.output, "prepare", "errors.parquet")
        prepared = prepare_instances(args.annotations, args.images, instances, errors,
                                     check_files=False, shard_images=cfg.data.prepare_shard_images,
                                     max_pixels=cfg.data.max_image_pixels)  # fmt: skip
        summary = label_instances(
            instances, args.images, args.checkpoint, args.output, cfg.crop, cfg.label,
            upstream_errors=read_table(errors), max_image_bytes=cfg.data.max_image_bytes,
        )  # fmt: skip
    # counted against the input annotations, not the table on disk
    out = summary["masks"] + summary["errors"] + summary["prepare_errors"]
    if out != prepared["annotations"]:
        raise OutputMismatch(
            f"{args.output}: {prepared['annotations']} input annotations, but {summary['masks']} "
            f"masks + {summary['errors']} + {summary['prepare_errors']} error rows"
        )
    export_uri = manifest.stage_uri(args.output, STAGE, EXPORT_NAME)
    exported = export_coco(
        manifest.stage_uri(args.output, STAGE, "masks"), args.annotations, export_uri,
        min_score=cfg.label.min_score,
    )  # fmt: skip
    summary = {**summary, "coco_json": export_uri, "exported": exported}
    errors = summary["errors"] + summary["prepare_errors"]
    print(
        f"pseudo_label: {summary['instances']} instances done: {summary['masks']} masks "
        f"({summary['empty_masks']} empty), {errors} errors ({summary['prepare_errors']} at "
        f"prepare); {summary['crops_per_s']} crops/s; {summary['shards_skipped']}/"
        f"{summary['shards']} shards resumed; COCO json {export_uri}"
    )
    if not storage.exists(export_uri):
        raise RuntimeError(f"export {export_uri} missing")
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
