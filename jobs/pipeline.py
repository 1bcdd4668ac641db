"""Run the EXITS pipeline: prepare -> 1a warm-up -> 1b generator -> 1c label -> 2 -> eval.

Usage:
    python jobs/pipeline.py --dataset demo --output runs/demo            # local Ray, CPU
    python jobs/pipeline.py --dataset demo --quick --output /tmp/q        # minimal, ~3 min
    ray job submit --working-dir . -- python jobs/pipeline.py --dataset lvis \
        --output s3://my-bucket/exits-runs/lvis
    python jobs/pipeline.py --dataset coco --output s3://b/run --set generator.epochs=5
    python jobs/pipeline.py --dataset demo --verbose      # Ray's own output on the console too

``--dataset`` is demo | coco | lvis | voc or a path to a dataset YAML. Re-running with the same
output skips finished stages (manifests) and resumes unfinished ones. One run owns an output at a
time (``<output>/lease.json``, :mod:`exits.lease`): a second job on it is refused while the
first runs; ``--take-over`` takes the lease of a dead run before it expires.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exits.config import load_config  # noqa: E402
from exits.manifest import STAGES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--dataset", default="demo", help="demo | coco | lvis | voc | path/to/dataset.yaml"
    )
    p.add_argument(
        "--output", default=None, help="run directory (local path or s3://bucket/prefix)"
    )
    p.add_argument(
        "--quick", action="store_true", help="minimal demo profile (every stage, tiny numbers)"
    )
    p.add_argument(
        "--stages", nargs="+", choices=STAGES, default=None, help="run only these stages"
    )
    p.add_argument(
        "--from-stage", choices=STAGES, default=None, help="run this stage and every later one"
    )
    p.add_argument(
        "--force", action="store_true", help="redo selected stages even when their manifest exists"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. generator.epochs=3 (repeatable)")  # fmt: skip
    p.add_argument(
        "--s3-endpoint", default=None, help="S3 endpoint override (else $EXITS_S3_ENDPOINT)"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray only: CPUs to use")
    p.add_argument("--take-over", action="store_true",
                   help="take the output's lease from another run (only when that run is dead)")  # fmt: skip
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output on the console too (else it goes to <output>/logs/)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick and args.dataset != "demo":
        raise SystemExit(
            f"--quick is the tiny demo profile (demo_quick.yaml); it has no {args.dataset!r} "
            "variant: drop --quick or pass --set overrides"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dataset = "demo_quick" if args.quick else args.dataset
    cfg = load_config(dataset, args.overrides)  # every value checked here, before Ray
    from exits import storage
    from exits.console import run_console
    from exits.lease import OutputLease
    from exits.pipeline import abspath_if_local, run_pipeline, summary_line

    if args.s3_endpoint:
        storage.configure_s3(endpoint=args.s3_endpoint)
    output = abspath_if_local(args.output or os.path.join("runs", cfg.data.name))
    # Under `ray job submit` RAY_ADDRESS is set and this connects to the cluster; otherwise a
    # local Ray instance is started. Quiet console unless --verbose (exits/console.py).
    # one owner per output directory, taken before anything (logs included) is written there
    with (
        OutputLease(output, take_over=args.take_over),
        run_console(output, verbose=args.verbose, num_cpus=args.num_cpus),
    ):
        results = run_pipeline(
            cfg, output, stages=args.stages, from_stage=args.from_stage, force=args.force
        )
    print(summary_line(results, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
