"""Peak RSS of a stage-1 worker's ingest: the whole instance table (before) vs windowed reads.

Writes an LVIS-shaped synthetic instance table (parts of 6,000 rows, GT RLE strings of ~600
bytes) at each size, then in a fresh process per (size, mode) measures the peak RSS above the
post-import baseline while one epoch of one rank's rows is read:
  whole:    ``read_table`` + ``CropDataset`` (what every worker did before issue 23);
  windowed: ``ShardedInstances`` (footers, the epoch's order, one window of rows at a time).
No image is decoded (that cost does not depend on the table's size). Last stdout line: JSON.

    python bench/train_ingest.py --sizes 20000 200000 --world 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROWS_PER_PART = 6000


def write_table(out: str, n: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from exits.data.coco import INSTANCE_SCHEMA

    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    for p, start in enumerate(range(0, n, ROWS_PER_PART)):
        m = min(ROWS_PER_PART, n - start)
        ids = np.arange(start, start + m)
        x0, y0 = rng.uniform(0, 400, m), rng.uniform(0, 300, m)
        w, h = rng.uniform(8, 200, m), rng.uniform(8, 150, m)
        pts = [
            [[int(a + b / 2), int(c)], [int(a), int(c + d / 2)], [int(a + b / 2), int(c + d - 1)],
             [int(a + b - 1), int(c + d / 2)]]
            for a, b, c, d in zip(x0, w, y0, h, strict=True)
        ]  # fmt: skip
        rle = [
            json.dumps({"size": [480, 640], "counts": "a" * int(k)})
            for k in rng.integers(300, 900, m)
        ]
        table = pa.table(
            {
                "image_id": ids // 12,
                "ann_id": ids,
                "category_id": rng.integers(1, 1204, m),
                "file_name": [f"train2017/{i // 12:012d}.jpg" for i in ids],
                "height": np.full(m, 480, np.int32),
                "width": np.full(m, 640, np.int32),
                "bbox": [[a, c, b, d] for a, b, c, d in zip(x0, w, y0, h, strict=True)],
                "extreme_points": pts,
                "iscrowd": np.zeros(m, bool),
                "area": w * h * 0.6,
                "separated": rng.random(m) < 0.1,
                "supervision": ["points"] * m,
                "points_source": ["gt_mask"] * m,
                "gt_segmentation": rle,
            },
            schema=INSTANCE_SCHEMA,
        )
        pq.write_table(table, os.path.join(out, f"part-{p:05d}.parquet"))


def measure(uri: str, mode: str, world: int, batch_size: int) -> dict:
    """Runs in a child process: peak RSS growth (MB) over the post-import baseline."""
    from exits.data.coco import read_table
    from exits.train.data import CropDataset, CropSpec, ShardedInstances
    from exits.train.shards import epoch_order, shard_windows

    spec = CropSpec(size=224, train=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    rows = 0
    if mode == "whole":
        ds = CropDataset(read_table(uri), "unused", spec)
        rows = len(ds)
    else:
        src = ShardedInstances(uri, "unused", spec)
        order = epoch_order(len(src), world, 0, 0, 0)
        for window in shard_windows(order, batch_size, src.window):
            rows += len(src.crops(window))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "baseline_mb": round(base, 1), "peak_growth_mb": round(peak - base, 1),
            "seconds": round(time.time() - t0, 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", nargs=2, metavar=("URI", "MODE"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], a.child[1], a.world, a.batch_size)))
        return
    out: dict = {"world": a.world, "sizes": a.sizes, "whole": [], "windowed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sizes:
            uri = os.path.join(tmp, f"instances-{n}.parquet")
            write_table(uri, n)
            for mode in ("whole", "windowed"):
                cmd = [sys.executable, __file__, "--child", uri, mode, "--world", str(a.world),
                       "--batch-size", str(a.batch_size)]  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                out[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(mode, n, out[mode][-1], file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
