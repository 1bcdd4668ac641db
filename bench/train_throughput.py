"""Stage-1 training throughput on Ray Train: samples/s for 1a and 1b at 1 and 2 workers.

Usage: python bench/train_throughput.py [--steps 30] [--batch 16]

Runs each (stage, workers) pair for ``--steps`` optimizer steps on the demo profile and reports
the median per-step samples/s measured on rank 0 (all workers' samples), excluding the first
3 steps (start-up). Prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exits.config import load_config  # noqa: E402
from exits.data.coco import write_table  # noqa: E402
from exits.data.prepare import load_instances  # noqa: E402
from exits.data.synthetic import write_demo_dataset  # noqa: E402
from exits.train.loops import loop_config  # noqa: E402
from exits.train.run import fit, history_from_result  # noqa: E402

WARMUP_STEPS_EXCLUDED = 3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    out = tempfile.mkdtemp(prefix="exits-tput-")
    data = write_demo_dataset(os.path.join(out, "data"), 96, 128, 0)
    inst, _ = load_instances(data["annotations"], data["images"])
    write_table(inst, os.path.join(out, "instances.parquet"))
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2
    )
    cfg = load_config("demo")
    results: dict = {}
    extractor = None
    for stage in ("warmup", "generator"):
        for workers in (1, 2):
            tc = cfg.warmup if stage == "warmup" else cfg.generator
            tc.num_workers, tc.max_steps, tc.batch_size, tc.epochs = (
                workers,
                args.steps,
                args.batch,
                1000,
            )
            tc.checkpoint_every = 10**6
            name = f"{stage}-{workers}"
            loop = loop_config(stage, os.path.join(out, "instances.parquet"), data["images"], cfg.crop, cfg.model,
                               cfg.retrieval, cfg.loss, tc, extractor_checkpoint=extractor)  # fmt: skip
            t = time.time()
            res = fit(loop, tc, os.path.join(out, name))
            wall = time.time() - t
            hist = history_from_result(res)[WARMUP_STEPS_EXCLUDED:]
            rates = sorted(h["samples_per_s"] for h in hist)
            results[name] = {"samples_per_s": round(rates[len(rates) // 2], 1), "wall_s": round(wall, 1),
                             "global_batch": args.batch * workers}  # fmt: skip
    ray.shutdown()
    for stage in ("warmup", "generator"):
        results[f"{stage}_scaling_2_vs_1"] = round(
            results[f"{stage}-2"]["samples_per_s"] / results[f"{stage}-1"]["samples_per_s"], 2
        )
    results["config"] = {"crop": cfg.crop.size, "generator": cfg.model.generator, "similarity": cfg.retrieval.similarity,
                         "crf": cfg.loss.crf, "batch_per_worker": args.batch}  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
