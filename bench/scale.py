"""Prepare, labelling's planning and the streaming export at LVIS scale, on a synthetic json.

Usage::

    python bench/scale.py [--instances 1270000] [--images 100000] [--workdir DIR] [--no-ray]

Workload: an LVIS-shaped COCO json (``--images`` images, ``--instances`` instances spread
unevenly over them and listed in random image order; polygons with perimeter-proportional
vertex counts (8-250, mean ~50), boxes log-uniform 6-400 px, 10 % of instances in two parts,
coordinates with 2 decimals). The images are a handful of tiny JPEGs of realistic sizes reused
by every image record: the bench measures the annotation side (the header check still opens
one file per image).

Phases, each in its own process so that each peak RSS is its own:
  generate  the json and the images (not timed into the results);
  prepare   ``exits.data.prepare.prepare_instances`` with Ray (``address="local"``, 2 CPUs,
            300 MB object store): driver peak RSS (json parse included), worker peak RSS;
  plan      stage 1c planning on the sharded table (read_instances, assign_shards, image_rows,
            fingerprint, the per-shard expected ids);
  masks     fake mask rows (the GT RLE as the pseudo mask: realistic RLE size), label shards;
  export    ``exits.label.export.export_coco`` (streaming).
``--driver-only``: generate, then only the driver's side of prepare (parse, plan, per-shard
rows): its peak RSS at full size when the shard tasks would take too long on a loaded box.

Prints one JSON object as the last line of stdout.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 512), (427, 640), (612, 612))
CATEGORIES = 1203  # LVIS v1
GB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--instances", type=int, default=1_270_000)
    p.add_argument("--images", type=int, default=0, help="0: instances / 12.7 (LVIS ratio)")
    p.add_argument("--shard-images", type=int, default=500)
    p.add_argument("--workdir", default="", help="default: a temp dir, removed afterwards")
    p.add_argument("--no-ray", action="store_true", help="prepare shards in-process")
    p.add_argument("--driver-only", action="store_true",
                   help="generate, then only the driver side of prepare (full-size memory)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", default="all", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> list:
    perimeter = np.pi * (rx + ry)
    k = int(np.clip(perimeter / 6, 8, 250))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    r = rng.uniform(0.6, 1.0, k)
    return np.round(np.stack([cx + rx * r * np.cos(ang), cy + ry * r * np.sin(ang)], 1), 2)


def generate(args: argparse.Namespace, work: str) -> dict:
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    n_img = args.images or max(1, round(args.instances / 12.7))
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    for k, (w, h) in enumerate(IMAGE_SIZES):
        Image.new("RGB", (w, h), (90, 120, 150)).save(os.path.join(work, "images", f"{k}.jpg"))
    # uneven instances per image (LVIS: 1 to hundreds), every image used at least once
    weights = rng.pareto(1.5, n_img) + 1
    per_image = 1 + rng.multinomial(args.instances - n_img, weights / weights.sum())
    image_of = rng.permutation(np.repeat(np.arange(n_img), per_image))
    path = os.path.join(work, "lvis_synthetic.json")
    with open(path, "w") as f:
        f.write('{"info": {"description": "exits bench/scale.py synthetic LVIS"}, "annotations": [')
        for i, img in enumerate(image_of):
            w, h = IMAGE_SIZES[img % len(IMAGE_SIZES)]
            bw, bh = np.exp(rng.uniform(np.log(6), np.log(400), 2))
            bw, bh = min(bw, w - 2), min(bh, h - 2)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            parts = 2 if rng.random() < 0.1 else 1
            polys = []
            for p in range(parts):
                pw = bw / parts
                polys.append(_polygon(rng, x0 + pw * (p + 0.5), y0 + bh / 2, pw / 2, bh / 2))
            pts = np.concatenate(polys)
            lo, hi = pts.min(0), pts.max(0)
            ann = {"area": round(float(bw * bh * 0.6), 2), "id": i + 1,
                   "segmentation": [p.ravel().tolist() for p in polys], "image_id": int(img) + 1,
                   "bbox": [round(float(v), 2) for v in (*lo, *(hi - lo))],
                   "category_id": int(rng.integers(1, CATEGORIES + 1))}  # fmt: skip
            f.write((", " if i else "") + json.dumps(ann))
        f.write('], "images": [')
        for j in range(n_img):
            w, h = IMAGE_SIZES[j % len(IMAGE_SIZES)]
            img = {"id": j + 1, "height": h, "width": w, "neg_category_ids": [],
                   "not_exhaustive_category_ids": [],
                   "coco_url": f"http://images.cocodataset.org/{j % len(IMAGE_SIZES)}.jpg"}  # fmt: skip
            f.write((", " if j else "") + json.dumps(img))
        cats = [{"id": c, "name": f"c{c}", "frequency": "f"} for c in range(1, CATEGORIES + 1)]
        f.write('], "licenses": [], "categories": ' + json.dumps(cats) + "}")
    return {"json_gb": round(os.path.getsize(path) / GB, 3), "images": n_img}


def prepare(args: argparse.Namespace, work: str) -> dict:
    from exits.data.prepare import prepare_instances

    imported = round(peak_rss_gb(), 3)
    if not args.no_ray:
        import ray

        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2,
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
    t0 = time.time()
    c = prepare_instances(
        os.path.join(work, "lvis_synthetic.json"), os.path.join(work, "images"),
        os.path.join(work, "prepare", "instances.parquet"),
        os.path.join(work, "prepare", "errors.parquet"), shard_images=args.shard_images,
    )  # fmt: skip
    seconds = time.time() - t0
    cpu = c["parse_cpu_s"] + c["shards_cpu_s"]
    return {"instances": c["instances"], "errors": c["errors"], "prepare_s": round(seconds, 1),
            "prepare_cpu_s": round(cpu, 1), "parse_cpu_s": c["parse_cpu_s"],
            # what 2 dedicated cores would do: the parse is serial, the shards run 2 at a time
            "prepare_2core_estimate_instances_per_s": round(
                c["annotations"] / (c["parse_cpu_s"] + c["shards_cpu_s"] / 2), 1),
            "driver_import_rss_gb": imported,
            "parse_s": c["parse_s"], "shards": c["shards"],
            "prepare_instances_per_s": round(c["annotations"] / seconds, 1),
            "driver_peak_rss_gb": round(peak_rss_gb(), 3),
            "worker_peak_rss_gb": round(c["worker_peak_rss_bytes"] / GB, 3)}  # fmt: skip


def driver(args: argparse.Namespace, work: str) -> dict:
    """Only the driver's side of prepare (parse, duplicates, shard plan, one shard's rows at a
    time): its peak RSS at full size, without the hour the shard tasks take on a loaded box."""
    import pyarrow as pa

    from exits.data.prepare import duplicate_flags, load_columns, plan_shards

    imported = round(peak_rss_gb(), 3)
    t0 = time.time()
    ann = load_columns(os.path.join(work, "lvis_synthetic.json")).annotations
    parse_s = time.time() - t0
    shards = plan_shards(ann, args.shard_images)
    ann = ann.append_column("duplicate", pa.array(duplicate_flags(ann))).combine_chunks()
    order = np.argsort(shards, kind="stable")
    starts = np.searchsorted(shards[order], np.arange(int(shards.max()) + 2))
    rows = sum(ann.take(pa.array(order[a:b])).num_rows for a, b in zip(starts[:-1], starts[1:]))
    return {"instances": rows, "driver_only_s": round(time.time() - t0, 1),
            "parse_s": round(parse_s, 1), "annotation_table_gb": round(ann.nbytes / GB, 3),
            "driver_import_rss_gb": imported, "driver_peak_rss_gb": round(peak_rss_gb(), 3)}  # fmt: skip


def plan(args: argparse.Namespace, work: str) -> dict:
    from exits.label.plan import (
        assign_shards,
        expected_ids,
        fingerprint,
        image_rows,
        read_instances,
    )

    imported = round(peak_rss_gb(), 3)
    t0 = time.time()
    table = assign_shards(read_instances(os.path.join(work, "prepare", "instances.parquet")), 10)
    rows = image_rows(table)
    fingerprint(table, bench=True)
    expected = expected_ids(table)
    return {"plan_s": round(time.time() - t0, 1), "plan_peak_rss_gb": round(peak_rss_gb(), 3),
            "plan_import_rss_gb": imported, "plan_images": rows.num_rows,
            "plan_shards": len(expected)}  # fmt: skip


def masks(args: argparse.Namespace, work: str) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from exits import storage
    from exits.data.coco import read_table, write_table
    from exits.label.commit import SHARD_FORMAT
    from exits.label.plan import MASK_SCHEMA

    parts = storage.list_dir(os.path.join(work, "prepare", "instances.parquet"))
    for k, uri in enumerate(parts):
        t = read_table(uri)
        n = t.num_rows
        xywh = t["bbox"]
        cols = {"ann_id": t["ann_id"], "image_id": t["image_id"], "category_id": t["category_id"],
                "bbox": xywh, "score": pa.array(np.full(n, 0.9)), "segmentation": t["gt_segmentation"],
                "area": t["area"], "generator": pa.array(["bench"] * n),
                "supervision": t["supervision"]}  # fmt: skip
        table = pa.table(cols).cast(MASK_SCHEMA)
        write_table(table, os.path.join(work, "label", "masks", SHARD_FORMAT.format(k)))
    seg = read_table(os.path.join(work, "prepare", "instances.parquet"), ["gt_segmentation"])
    mean = pc.mean(pc.utf8_length(seg["gt_segmentation"])).as_py()
    return {"mask_shards": len(parts), "mean_rle_json_bytes": round(mean or 0, 1)}


def export(args: argparse.Namespace, work: str) -> dict:
    from exits.label.export import export_coco

    imported = round(peak_rss_gb(), 3)
    t0 = time.time()
    out = os.path.join(work, "label", "pseudo_coco.json")
    c = export_coco(os.path.join(work, "label", "masks"),
                    os.path.join(work, "lvis_synthetic.json"), out)  # fmt: skip
    return {"export_s": round(time.time() - t0, 1), "export_peak_rss_gb": round(peak_rss_gb(), 3),
            "export_import_rss_gb": imported, "exported_annotations": c["annotations"],
            "export_gb": round(os.path.getsize(out) / GB, 3)}  # fmt: skip


PHASES = {"generate": generate, "prepare": prepare, "plan": plan, "masks": masks, "export": export}
EXTRA_PHASES = {"driver": driver}


def run_phase(name: str, argv: list[str], work: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--phase", name, "--workdir", work]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"phase {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.phase != "all":
        result = {**PHASES, **EXTRA_PHASES}[args.phase](args, args.workdir)
        print(json.dumps(result))
        return result
    child = ["--instances", str(args.instances), "--images", str(args.images),
             "--shard-images", str(args.shard_images), "--seed", str(args.seed)]  # fmt: skip
    child += ["--no-ray"] if args.no_ray else []
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as work:
        result: dict = {"load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        for name in ("generate", "driver") if args.driver_only else PHASES:
            started = time.time()
            result.update(run_phase(name, child, work))
            if name == "generate":
                result["generate_s"] = round(time.time() - started, 1)
        result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if args.driver_only:
        print(json.dumps(result))
        return result
    keys = ("instances", "prepare_s", "prepare_instances_per_s", "driver_peak_rss_gb",
            "worker_peak_rss_gb", "export_s", "export_peak_rss_gb")  # fmt: skip
    ordered = {k: result[k] for k in keys} | {k: v for k, v in result.items() if k not in keys}
    print(json.dumps(ordered))
    return ordered


if __name__ == "__main__":
    main()
