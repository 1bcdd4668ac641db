"""Every stage's memory and time at LVIS scale, on a synthetic LVIS-shaped json.

Usage::

    python bench/scale.py [--instances 1270000] [--images 100000] [--workdir DIR] [--no-ray]
    python bench/scale.py --stages all [--sizes 10000,100000] [--workdir DIR] [--keep]

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
  plan      stage 1c planning as its driver does it (scan_input, fingerprint, the per-shard
            expected ids, image_blocks);
  masks     fake mask rows (the GT RLE as the pseudo mask: realistic RLE size), label shards;
  export    ``exits.label.export.export_coco`` (streaming).
``--stages all``: every pipeline stage (prepare, warmup, generator, label, export, stage2,
eval) at two sizes 10x apart, each through the real path (``jobs/pipeline.py``'s ``main
--stages <stage>`` on one run directory, local Ray with ``--num-cpus``; export: the
``export_coco`` call that ends stage 1c, alone), each stage in its own process. The workload:
the json above with image sizes x ``--image-scale``, a fixed ``--val-instances`` val json, the
demo profile (tiny ViT, crop ``--crop-size``), ``--train-steps`` steps of 1a and 1b, 1 worker
each, ``--stage2-iters`` Mask R-CNN iterations on CPU. Per stage: the stage's own seconds (its
manifest; export: the call), instances/s (size / seconds: for the fixed-step training stages a
measure of their per-instance overhead, not a training rate), the driver's peak RSS and the
largest Ray worker process's (psutil samples every 0.2 s), both as growth over the process's
RSS after the stage's imports (``import_rss_gb``; workers: ``worker_import_rss_gb``, a plain
process importing what the stage's workers import). Beside RSS, the private memory (RSS
minus the shared pages: what Ray's memory monitor and the OOM killer count; object-store
pages a worker has touched are shared and are not in it), over its own import baseline:
``driver_private_gb`` / ``worker_private_gb``. Last line: ``{"sizes": [small, large],
"stages": {stage: {"wall_s": [a, b], "instances_per_s": [a, b], "driver_peak_rss_gb": [a, b],
"worker_peak_rss_gb": [a, b], "driver_private_gb": [a, b], "worker_private_gb": [a, b],
"import_rss_gb": [a, b], "worker_import_rss_gb": [a, b]}}, "verdict": {...}}``, the verdict
being the memory goal (growth <= 10 %, <= 4 GB at 1.27 M instances by linear extrapolation),
for RSS and for private memory.
``--driver-only``: generate, then only the driver's side of prepare (parse, plan, per-shard
rows): its peak RSS at full size when the shard tasks would take too long on a loaded box.

Prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
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
SERIES_INTERVAL_S = 10.0  # the sampler's private-memory time series


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
    p.add_argument(
        "--stages",
        choices=["all"],
        default=None,
        help="every pipeline stage at --sizes (see 'Stages' above)",
    )
    # 100 k: ~15-20 min on 2 quiet cores (estimated from 2 k under load: labelling ~200
    # crops/s at S = 64, eval >= 400 instances/s); 200 k would take ~30 min
    p.add_argument("--sizes", default="10000,100000", help="--stages all: small,large instances")
    p.add_argument(
        "--image-scale", type=float, default=0.25, help="--stages all: LVIS image sizes times this"
    )
    p.add_argument("--val-instances", type=int, default=200, help="--stages all: val json size")
    p.add_argument("--crop-size", type=int, default=64, help="--stages all: crop.size S")
    p.add_argument("--train-steps", type=int, default=3, help="--stages all: 1a/1b max_steps")
    p.add_argument("--stage2-iters", type=int, default=4, help="--stages all: stage-2 iterations")
    p.add_argument("--num-cpus", type=int, default=2, help="--stages all: local Ray CPUs")
    p.add_argument("--keep", action="store_true", help="--stages all: keep the work directory")
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


def write_lvis_json(path: str, rng: np.random.Generator, instances: int, n_img: int,
                    sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES) -> None:  # fmt: skip
    """An LVIS-v1-shaped json of ``instances`` annotations over ``n_img`` image records whose
    ``coco_url`` names ``<k>.jpg`` (``sizes[k]`` = its (width, height))."""
    # uneven instances per image (LVIS: 1 to hundreds), every image used at least once
    weights = rng.pareto(1.5, n_img) + 1
    per_image = 1 + rng.multinomial(instances - n_img, weights / weights.sum())
    image_of = rng.permutation(np.repeat(np.arange(n_img), per_image))
    with open(path, "w") as f:
        f.write('{"info": {"description": "exits bench/scale.py synthetic LVIS"}, "annotations": [')
        for i, img in enumerate(image_of):
            w, h = sizes[img % len(sizes)]
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
            w, h = sizes[j % len(sizes)]
            img = {"id": j + 1, "height": h, "width": w, "neg_category_ids": [],
                   "not_exhaustive_category_ids": [],
                   "coco_url": f"http://images.cocodataset.org/{j % len(sizes)}.jpg"}  # fmt: skip
            f.write((", " if j else "") + json.dumps(img))
        cats = [{"id": c, "name": f"c{c}", "frequency": "f"} for c in range(1, CATEGORIES + 1)]
        f.write('], "licenses": [], "categories": ' + json.dumps(cats) + "}")


def write_images(work: str, sizes: tuple[tuple[int, int], ...]) -> None:
    """One tiny JPEG per size, ``images/<k>.jpg``, reused by every image record."""
    from PIL import Image

    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (90, 120, 150)).save(os.path.join(work, "images", f"{k}.jpg"))


def generate(args: argparse.Namespace, work: str) -> dict:
    rng = np.random.default_rng(args.seed)
    n_img = args.images or max(1, round(args.instances / 12.7))
    write_images(work, IMAGE_SIZES)
    path = os.path.join(work, "lvis_synthetic.json")
    write_lvis_json(path, rng, args.instances, n_img)
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
    """The labelling driver's planning as ``label_instances`` does it (without Ray's put)."""
    from exits.label.plan import expected_ids, fingerprint, image_blocks, scan_input

    imported = round(peak_rss_gb(), 3)
    t0 = time.time()
    uri = os.path.join(work, "prepare", "instances.parquet")
    scan = scan_input(uri, 10)
    fingerprint(scan.digest, bench=True)
    expected = expected_ids(scan.shard, scan.ann_id)
    images = sum(b.num_rows for b in image_blocks(uri, scan.image_ids, 10, set(), 8, 128))
    return {"plan_s": round(time.time() - t0, 1), "plan_peak_rss_gb": round(peak_rss_gb(), 3),
            "plan_import_rss_gb": imported, "plan_images": images,
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


# --------------------------------------------------------------------------------------
# --stages all: every pipeline stage at two sizes, each stage in its own process
# --------------------------------------------------------------------------------------
RUN_ORDER = ("prepare", "warmup", "generator", "label", "export", "stage2", "eval")
REPORT_ORDER = ("prepare", "warmup", "generator", "label", "export", "eval", "stage2")
GOAL_GROWTH = 0.10  # peak RSS growth small -> large (imports excluded)
GOAL_INSTANCES = 1_270_000  # LVIS v1 train
GOAL_GB = 4.0  # per process at GOAL_INSTANCES, imports included
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# imported before the baseline RSS is taken, so that a peak is what the stage holds, not code
COMMON_IMPORTS = ("exits", "numpy", "pyarrow", "pyarrow.parquet", "torch", "ray", "ray.data",
                  "exits.pipeline", "exits.console", "jobs.pipeline")  # fmt: skip
STAGE_IMPORTS = {
    "prepare": ("exits.data.prepare", "exits.pipeline.prepare"),
    "warmup": ("ray.train.torch", "exits.train.loops", "exits.train.run", "timm"),
    "generator": ("ray.train.torch", "exits.train.loops", "exits.train.run", "timm"),
    "label": ("exits.label", "exits.label.export", "exits.inference", "timm"),
    "export": ("exits.label.export",),
    "stage2": (
        "ray.train.torch",
        "mmengine.runner",
        "mmdet.models",
        "mmdet.datasets",
        "lvis",
        "exits.stage2.driver",
        "exits.stage2.train_eval",
    ),  # fmt: skip
    "eval": ("pycocotools.mask", "lvis", "exits.pipeline.eval", "exits.evaluate.metrics"),
}
# what a stage's Ray worker processes import: their baseline, measured in a plain process
WORKER_IMPORTS = {
    "prepare": ("ray", "ray.data", "pyarrow.parquet", "exits.data.prepare"),
    "warmup": ("ray", "ray.train.torch", "torch", "timm", "exits.train.loops"),
    "generator": ("ray", "ray.train.torch", "torch", "timm", "exits.train.loops"),
    "label": ("ray", "ray.data", "torch", "timm", "exits.label.stages", "exits.inference"),
    "export": (),
    "stage2": (
        "ray",
        "ray.train.torch",
        "torch",
        "mmengine.runner",
        "mmdet.models",
        "mmdet.datasets",
        "lvis",
        "exits.stage2.worker",
    ),  # fmt: skip
    "eval": ("ray", "ray.data", "pycocotools.mask", "exits.pipeline.eval"),
}


def scaled_sizes(scale: float) -> tuple[tuple[int, int], ...]:
    """LVIS's image sizes times ``scale`` (at least 32 px a side)."""
    return tuple((max(32, round(w * scale)), max(32, round(h * scale))) for w, h in IMAGE_SIZES)


def dataset_yaml(work: str, args: argparse.Namespace) -> dict:
    """The run's dataset config: the demo profile (tiny ViT, CPU) on the synthetic LVIS json,
    a few training steps and stage-2 iterations (their cost does not grow with the table)."""
    train = {"epochs": 1, "max_steps": args.train_steps, "batch_size": 8, "num_workers": 1}
    return {"base": os.path.join(REPO, "configs", "datasets", "demo.yaml"),
            "data": {"name": "lvis", "annotations": os.path.join(work, "lvis_train.json"),
                     "images": os.path.join(work, "images"),
                     "val_annotations": os.path.join(work, "lvis_val.json"),
                     "val_images": os.path.join(work, "images")},
            "crop": {"size": args.crop_size}, "warmup": train, "generator": dict(train),
            "label": {"num_actors": 1},
            "stage2": {"max_iters": args.stage2_iters, "num_workers": 1, "cpus_per_worker": 1,
                       "batch_size": 2, "image_size": 128}}  # fmt: skip


def generate_lvis(args: argparse.Namespace, work: str) -> dict:
    """Train json (``--instances``), a fixed-size val json (``--val-instances``: LVIS's val
    does not grow with the train set), the images and the dataset YAML."""
    import yaml

    sizes = scaled_sizes(args.image_scale)
    write_images(work, sizes)
    n_img = args.images or max(1, round(args.instances / 12.7))
    rng = np.random.default_rng(args.seed)
    write_lvis_json(os.path.join(work, "lvis_train.json"), rng, args.instances, n_img, sizes)
    n_val = max(1, round(args.val_instances / 12.7))
    rng = np.random.default_rng(args.seed + 1)
    write_lvis_json(os.path.join(work, "lvis_val.json"), rng, args.val_instances, n_val, sizes)
    with open(os.path.join(work, "dataset.yaml"), "w") as f:
        yaml.safe_dump(dataset_yaml(work, args), f)
    return {"images": n_img, "val_instances": args.val_instances}


class RssSampler:
    """Samples this process's RSS and that of its Ray worker processes (descendants whose
    command line is ``ray::…`` or runs ``default_worker.py``) every ``interval_s`` in a thread;
    keeps the max of each (bytes), and of each's private memory (RSS minus resident shared
    pages: what Ray's own memory monitor counts for a worker, since the object store's shared
    pages a worker has touched sit in its RSS while they are owned by the store)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import threading

        import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)

        self.psutil = __import__("psutil")
        self.interval_s = interval_s
        self.driver_max = 0
        self.worker_max = 0
        self.driver_private_max = 0
        self.worker_private_max = 0
        self.worker_private_title = ""  # the process title of the worker at its private peak
        self.series: list[tuple[float, int, int]] = []  # (s, driver private, max worker private)
        self.workers_seen: set[int] = set()
        self._t0 = time.time()
        self._next_series = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = self.psutil.Process()
        mi = me.memory_info()
        self.driver_max = max(self.driver_max, mi.rss)
        driver_private = mi.rss - mi.shared
        self.driver_private_max = max(self.driver_private_max, driver_private)
        worker_private = 0
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    mi = p.memory_info()
                    self.worker_max = max(self.worker_max, mi.rss)
                    worker_private = max(worker_private, mi.rss - mi.shared)
                    if mi.rss - mi.shared > self.worker_private_max:
                        self.worker_private_max = mi.rss - mi.shared
                        self.worker_private_title = cmd[:80]
                    self.workers_seen.add(p.pid)
            except self.psutil.Error:  # gone meanwhile
                continue
        now = time.time() - self._t0
        if now >= self._next_series:  # a coarse time series: does a peak plateau or climb?
            self.series.append((round(now, 1), driver_private, worker_private))
            self._next_series = now + SERIES_INTERVAL_S

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def private_bytes() -> int:
    """This process's RSS minus its resident shared pages (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def import_rss_bytes(modules: tuple[str, ...]) -> tuple[int, int]:
    """(peak RSS, private memory) of a fresh Python process after importing ``modules`` ((0, 0)
    for none): the baseline of a Ray worker process of a stage (a real worker also holds Ray's
    core worker, ~0.1 GB, the same at every size)."""
    if not modules:
        return 0, 0
    code = (f"import gc, importlib, os, resource, sys; sys.path.insert(0, {REPO!r}); "
            f"[importlib.import_module(m) for m in {list(modules)!r}]; gc.collect(); "
            "f = open('/proc/self/statm').read().split(); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
            "(int(f[1]) - int(f[2])) * os.sysconf('SC_PAGE_SIZE'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss, private = out.stdout.strip().splitlines()[-1].split()
    return int(rss), int(private)


def run_stage(args: argparse.Namespace, work: str) -> dict:
    """One stage in this process (``--phase stage:<name>``): the pipeline's own entry point
    (``jobs/pipeline.py``'s ``main``, local Ray) for a pipeline stage; ``export_coco`` (what
    stage 1c calls last) for ``export``. Peaks are growth over this process's RSS after the
    stage's imports; its Ray workers' over :func:`import_rss_bytes` of their imports."""
    import gc
    import importlib

    stage = args.phase.split(":", 1)[1]
    worker_base, worker_private_base = import_rss_bytes(WORKER_IMPORTS[stage])
    for name in (*COMMON_IMPORTS, *STAGE_IMPORTS[stage]):
        importlib.import_module(name)
    gc.collect()
    sampler = RssSampler()
    base, private_base = sampler.psutil.Process().memory_info().rss, private_bytes()
    run = os.path.join(work, "run")
    t0 = time.time()
    with sampler:
        if stage == "export":
            from exits.label.export import export_coco

            out = os.path.join(work, "export_bench.json")
            export_coco(os.path.join(run, "label", "masks"),
                        os.path.join(work, "lvis_train.json"), out)  # fmt: skip
        else:
            from jobs.pipeline import main as pipeline_main

            pipeline_main(["--dataset", os.path.join(work, "dataset.yaml"), "--output", run,
                           "--stages", stage, "--num-cpus", str(args.num_cpus), "--force"])  # fmt: skip
    process_s = time.time() - t0
    wall = process_s
    if stage != "export":
        with open(os.path.join(run, stage, "manifest.json")) as f:
            wall = json.load(f)["seconds"]  # the stage itself, without Ray's start and stop
    driver = max(sampler.driver_max, int(peak_rss_gb() * GB))
    return {"stage": stage, "wall_s": round(wall, 2), "process_s": round(process_s, 2),
            "import_rss_gb": round(base / GB, 3),
            "worker_import_rss_gb": round(worker_base / GB, 3),
            "driver_peak_rss_gb": round(max(0, driver - base) / GB, 3),
            "worker_peak_rss_gb": round(max(0, sampler.worker_max - worker_base) / GB, 3),
            "driver_private_gb": round(max(0, sampler.driver_private_max - private_base) / GB, 3),
            "worker_private_gb": round(
                max(0, sampler.worker_private_max - worker_private_base) / GB, 3
            ),
            "driver_raw_peak_gb": round(driver / GB, 3),
            "worker_raw_peak_gb": round(sampler.worker_max / GB, 3),
            "ray_workers_seen": len(sampler.workers_seen),
            "worker_private_peak_title": sampler.worker_private_title,
            # (s, driver private, largest worker private) in MB over the import baselines
            "private_series_mb": [(t, round((d - private_base) / 2**20),
                                   round((w - worker_private_base) / 2**20) if w else 0)
                                  for t, d, w in sampler.series]}  # fmt: skip


def assemble(sizes: list[int], runs: list[dict[str, dict]]) -> dict:
    """The bench's JSON: ``runs[i][stage]`` (from :func:`run_stage`) measured at ``sizes[i]``
    instances -> ``{"sizes": [...], "stages": {stage: {"wall_s": [...], "instances_per_s":
    [...], "driver_peak_rss_gb": [...], "worker_peak_rss_gb": [...], "import_rss_gb": [...],
    "worker_import_rss_gb": [...]}}}``
    (lists in the order of ``sizes``; instances/s = the size over the stage's wall time)."""
    stages = {}
    for stage in REPORT_ORDER:
        rows = [r[stage] for r in runs if stage in r]
        if len(rows) != len(sizes):
            continue
        walls = [float(r["wall_s"]) for r in rows]
        stages[stage] = {
            "wall_s": [round(w, 1) for w in walls],
            "instances_per_s": [round(n / w, 1) if w > 0 else None for n, w in zip(sizes, walls)],
            **{k: [r[k] for r in rows]
               for k in ("driver_peak_rss_gb", "worker_peak_rss_gb", "import_rss_gb",
                         "worker_import_rss_gb", "driver_private_gb", "worker_private_gb")
               if all(k in r for r in rows)},
        }  # fmt: skip
    return {"sizes": list(sizes), "stages": stages}


def growth(small: float, large: float) -> float:
    """Relative growth ``large / small - 1`` (0 when both are 0; inf from 0 to more)."""
    if small > 0:
        return large / small - 1
    return 0.0 if large <= 0 else float("inf")


def extrapolate(sizes: list[int], values: list[float], at: float) -> float:
    """The straight line through ``(sizes[0], values[0])`` and ``(sizes[1], values[1])`` at
    ``at``."""
    (s0, s1), (v0, v1) = sizes, values
    return v0 + (v1 - v0) * (at - s0) / (s1 - s0)


def verdict(result: dict, *, max_growth: float = GOAL_GROWTH, at: float = GOAL_INSTANCES,
            limit_gb: float = GOAL_GB) -> dict:  # fmt: skip
    """The memory goal per stage from :func:`assemble`'s two sizes: driver and worker peak
    growth (imports excluded) <= ``max_growth``, and each peak extrapolated linearly to ``at``
    instances plus the import baseline <= ``limit_gb``."""
    sizes = result["sizes"]
    out: dict = {}
    for stage, r in result["stages"].items():
        row: dict = {}
        for kind in ("driver", "worker"):
            v = r[f"{kind}_peak_rss_gb"]
            g = growth(*v)
            imports = max(r["import_rss_gb" if kind == "driver" else "worker_import_rss_gb"])
            x = imports + max(0.0, extrapolate(sizes, v, at))
            row[f"{kind}_growth"] = round(g, 3)
            row[f"{kind}_at_goal_gb"] = round(x, 3)
            row[f"{kind}_ok"] = g <= max_growth and x <= limit_gb
            if f"{kind}_private_gb" in r:  # RSS minus shared pages (object-store pages out)
                row[f"{kind}_private_growth"] = round(growth(*r[f"{kind}_private_gb"]), 3)
        out[stage] = row
    out["all_ok"] = all(r["driver_ok"] and r["worker_ok"] for r in out.values())
    return out


def main_all_stages(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) not in (1, 2) or min(sizes) < 100:
        raise SystemExit(f"--sizes: one or two sizes >= 100, got {args.sizes!r}")
    runs = []
    with contextlib.ExitStack() as stack:
        if args.keep:  # the run directories (logs under run/logs) stay for a look
            root = tempfile.mkdtemp(prefix="exits-scale-", dir=args.workdir or None)
            print(f"work directory kept: {root}", file=sys.stderr)
        else:
            root = stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir or None))
        load = round(os.getloadavg()[0], 2)
        for n in sizes:
            work = os.path.join(root, f"n{n}")
            os.makedirs(work)
            child = ["--instances", str(n), "--seed", str(args.seed), "--image-scale",
                     str(args.image_scale), "--val-instances", str(args.val_instances),
                     "--crop-size", str(args.crop_size), "--train-steps", str(args.train_steps),
                     "--stage2-iters", str(args.stage2_iters), "--num-cpus", str(args.num_cpus)]  # fmt: skip
            run_phase("generate_lvis", child, work)
            runs.append({stage: run_phase(f"stage:{stage}", child, work) for stage in RUN_ORDER})
    result = assemble(sizes, runs)
    if len(sizes) == 2:
        result["verdict"] = verdict(result)
    result["load_avg_1m"] = [load, round(os.getloadavg()[0], 2)]
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))
    return result


PHASES = {"generate": generate, "prepare": prepare, "plan": plan, "masks": masks, "export": export}
EXTRA_PHASES = {"driver": driver, "generate_lvis": generate_lvis}


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
    if args.phase.startswith("stage:"):
        result = run_stage(args, args.workdir)
        print(json.dumps(result))
        return result
    if args.phase != "all":
        result = {**PHASES, **EXTRA_PHASES}[args.phase](args, args.workdir)
        print(json.dumps(result))
        return result
    if args.stages:
        return main_all_stages(args)
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
