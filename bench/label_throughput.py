"""Stage 1c throughput and memory: Ray Data actor pools vs the bare one-core loop.

Usage::

    python bench/label_throughput.py                      # defaults below: ViT-S/14 at 224²
    python bench/label_throughput.py --images 120 --runs 3 --pools 1x1,1x1.5,2x0.75
    python bench/label_throughput.py --generator vit_tiny_demo --crop-size 96 --images 240
    python bench/label_throughput.py --data coco_mini --images 64 --pools 1x1,2x0.75  # real photos

Workload: the synthetic demo set (128² images, 2-4 instances each), or with ``--data
coco_mini`` the real COCO photos of that profile (``data.annotations`` / ``data.images`` of
configs/datasets/coco_mini.yaml: ../shared/data/coco_train128, 640-px JPEGs, ~7 instances
each; the first ``--images`` images by id; a directory holding ``instances*.json`` and
``images/`` works too; absent data: the bench prints ``{"skipped": ...}`` and exits 0), and
the generator the pretrained profiles ship, ``vit_small_dinov2`` (DINOv2 ViT-S/14 + MAL decoder) at 224² crops
(random weights: the same compute, nothing to download), on CPU. Every side runs the same
code on the same images: ``exits.label.crop_images`` (decode + crop), ``MaskPredictor.predict``
(model), ``paste_masks`` (sigmoid, paste, threshold, RLE) and, in the pipeline, the shard
commit.

- bare loop: one process, one torch thread, no Ray; it reports the per-stage split
  (decode / model / paste seconds; ``score``: the quality score inside paste, and
  ``score_share``: its seconds over the loop's, issue 25's cost goal);
- pools: ``label_instances`` on a local Ray with exactly ``os.cpu_count()`` logical CPUs (the
  machine's real cores: no oversubscription). ``AxC`` = A actors reserving C CPUs each; each
  actor runs ceil(C) torch threads; the decode/paste tasks reserve the CPUs left
  (cores - A*C, split between the two; ``exits.label.stages.fit_task_cpus``). Each pool
  labels one image (warm-up), a third of the images, then all of them, in one Ray session;
  its rate is the *incremental* one, (crops_all - crops_third) / (s_all - s_third): actor
  start-up, model load and pipeline fill/drain cancel out. ``e2e`` rates and
  ``first_result_s`` include everything after planning (actor start-up, model load, fill):
  what a user's run of that size sees, less Ray's start and prepare. (Results used to bunch
  up at the end: Ray Data's iterator prefetch held each block until the next one existed;
  ``label_instances`` now takes blocks as they land.)
- ``--runs`` rounds (default 3), each: the bare loop, then every pool; a pool's ratio is its
  incremental crops/s over the same round's bare crops/s. Reported: the median ratio per pool
  and its spread (min, max), never the best round.
- memory: peak RSS summed over the driver and the Ray worker processes (tasks, actors),
  sampled every 0.2 s, for N and scale x N images (first pool); Ray's daemons reported apart.
  Synthetic data only (a real-photo set is too small for 10x growth).

Prints progress, then one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402

from exits import inference  # noqa: E402
from exits.checkpoints import save_model  # noqa: E402
from exits.config import CropConfig, LabelConfig, load_config  # noqa: E402
from exits.data.prepare import load_instances  # noqa: E402
from exits.data.synthetic import write_demo_dataset  # noqa: E402
from exits.label import (  # noqa: E402
    MaskPredictor,
    assign_shards,
    crop_images,
    image_rows,
    label_instances,
    paste_masks,
    read_instances,
)
from exits.model.generator import GENERATORS, build_generator  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = os.cpu_count() or 1
SYNTHETIC = "synthetic"
OBJECT_STORE = 300 * 1024**2
RAY_DAEMONS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # besides raylet, gcs_server, ...


def make_dataset(root: str, num_images: int) -> dict:
    data = write_demo_dataset(os.path.join(root, f"demo{num_images}"), num_images=num_images,
                              image_size=128, seed=0, val_fraction=0.0)  # fmt: skip
    instances, errors = load_instances(data["annotations"], data["images"], check_files=False)
    assert errors.num_rows == 0
    return {"images": data["images"], "instances": instances}


def find_photos(spec: str) -> dict | None:
    """{"annotations", "images"} of a real-photo set, None when its files are absent.

    ``spec``: a directory holding ``images/`` and ``instances*.json`` (or
    ``annotations/instances*.json``; the first by name is used), or a profile name
    (configs/datasets/<spec>.yaml: its ``data.annotations`` and ``data.images``, relative to
    the working directory or the repository).
    """
    if os.path.isdir(spec):
        jsons = sorted(glob.glob(os.path.join(spec, "instances*.json")))
        jsons += sorted(glob.glob(os.path.join(spec, "annotations", "instances*.json")))
        pairs = [(jsons[0], os.path.join(spec, "images"))] if jsons else []
    else:
        data = load_config(spec).data  # an unknown profile name raises, naming the choices
        if not data.annotations or not data.images:
            raise ValueError(f"profile {spec!r} names no data.annotations / data.images")
        pairs = [(os.path.join(base, data.annotations), os.path.join(base, data.images))
                 for base in ("", REPO)]  # fmt: skip
    for ann, images in pairs:
        if os.path.isfile(ann) and os.path.isdir(images):
            return {"annotations": ann, "images": images}
    return None


class Photos:
    """A real-photo set loaded once; :meth:`subset` gives the first ``n`` images by id with
    every instance of theirs (the rows prepare accepts: crowd and degenerate ones stay out)."""

    def __init__(self, annotations: str, images: str) -> None:
        self.images = images
        self.instances, _ = load_instances(annotations, images, check_files=False)
        self.image_ids = np.unique(self.instances["image_id"].to_numpy())

    def subset(self, n: int) -> dict:
        if not 1 <= n <= len(self.image_ids):
            raise ValueError(
                f"{n} images asked, the set has 1..{len(self.image_ids)} with instances"
            )
        keep = pc.is_in(self.instances["image_id"], value_set=pa.array(self.image_ids[:n]))
        return {"images": self.images, "instances": self.instances.filter(keep)}


def bare_loop(instances, images: str, checkpoint: str, crop: CropConfig, cfg: LabelConfig) -> dict:
    """The same decode+crop, model and paste work in one process, one thread, no Ray."""
    torch.set_num_threads(1)
    predictor = MaskPredictor(checkpoint, crop_size=crop.size)
    split = {"decode": 0.0, "model": 0.0, "paste": 0.0, "score": 0.0}  # score: inside paste
    shipped_score = inference.mask_score

    def timed_score(*args, **kwargs) -> float:  # the quality score's share (issue 25)
        t = time.perf_counter()
        try:
            return shipped_score(*args, **kwargs)
        finally:
            split["score"] += time.perf_counter() - t

    inference.mask_score = timed_score  # threshold_and_score looks it up at each call
    try:
        return _bare_loop(instances, images, predictor, crop, cfg, split)
    finally:
        inference.mask_score = shipped_score


def _bare_loop(instances, images: str, predictor, crop: CropConfig, cfg: LabelConfig,
               split: dict[str, float]) -> dict:  # fmt: skip
    rows = image_rows(assign_shards(read_instances(instances), 1 << 30))
    t0, n = time.time(), 0
    pending: dict[str, list] = {}

    def flush(batch: dict[str, np.ndarray]) -> int:
        t = time.perf_counter()
        crops = batch.pop("crop")
        batch["logits"] = predictor.predict(crops)
        batch["generator"] = np.full(len(crops), predictor.generator_id, dtype=object)
        t1 = time.perf_counter()
        rows_out = paste_masks(batch, threshold=cfg.threshold).num_rows
        split["model"] += t1 - t
        split["paste"] += time.perf_counter() - t1
        return rows_out

    for i in range(0, rows.num_rows, cfg.images_per_block):
        t = time.perf_counter()
        out = crop_images(rows.slice(i, cfg.images_per_block), images=images, size=crop.size,
                          enlarge=crop.inference_enlarge)  # fmt: skip
        split["decode"] += time.perf_counter() - t
        for k, v in out.items():
            pending.setdefault(k, []).append(v)
        while sum(len(v) for v in pending["ann_id"]) >= cfg.batch_size:
            cat = {k: np.concatenate(v) for k, v in pending.items()}
            head = {k: v[: cfg.batch_size] for k, v in cat.items()}
            pending = {k: [v[cfg.batch_size :]] for k, v in cat.items()}
            n += flush(head)
    if pending and sum(len(v) for v in pending["ann_id"]):
        n += flush({k: np.concatenate(v) for k, v in pending.items()})
    seconds = time.time() - t0
    return {"crops": n, "seconds": round(seconds, 2), "crops_per_s": round(n / seconds, 2),
            "split_s": {k: round(v, 3) for k, v in split.items()},
            "score_share": round(split["score"] / seconds, 5)}  # fmt: skip


class RssSampler:
    """Peak memory of the driver plus Ray worker processes (tasks and actors), summed per sample.

    ``peak`` sums RSS; ``peak_private`` sums RSS minus shared pages (``memory_info().shared``),
    i.e. without the object store's shared memory, which every worker that touched a page
    counts again (the store itself is capped by ``object_store_memory``). Ray's daemons (GCS,
    raylet, agents) are only in ``peak_all``.
    """

    def __init__(self, interval: float = 0.2) -> None:
        import psutil  # vendored by ray (ray/thirdparty_files)

        self.psutil, self.interval = psutil, interval
        self.peak = self.peak_private = self.peak_all = self.max_workers = 0
        self.names_at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        info = me.memory_info()
        rss, private, total, names = info.rss, info.rss - info.shared, info.rss, {"driver": 1}
        for p in me.children(recursive=True):
            try:
                info = p.memory_info()
                name = p.name()
                is_worker = name.startswith("ray::") and name not in RAY_DAEMONS
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            total += info.rss
            if is_worker:
                rss += info.rss
                private += info.rss - info.shared
                names[name] = names.get(name, 0) + 1
        if private > self.peak_private:
            self.peak_private, self.names_at_peak = private, names
        self.peak = max(self.peak, rss)
        self.peak_all = max(self.peak_all, total)
        self.max_workers = max(self.max_workers, sum(names.values()) - 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ray_run(ds: dict, checkpoint: str, out: str, crop: CropConfig, cfg: LabelConfig,
            measure_rss: bool = False, small: dict | None = None) -> dict:  # fmt: skip
    """``label_instances`` on ``ds`` in a fresh local Ray. With ``small`` (a subset, whose
    ``"warmup"`` entry is a 1-image set run before it), that runs first in the same Ray session
    and ``incremental_crops_per_s`` = extra crops / extra seconds of the full run: actor start-up, model load and pipeline fill/drain cancel out, and it does
    not depend on how result batches are grouped when they reach the driver."""
    import ray
    import ray.data

    ray.init(
        address="local",
        num_cpus=CORES,  # the machine's real cores: no oversubscription
        object_store_memory=OBJECT_STORE,
        include_dashboard=False,
        log_to_driver=False,
    )
    # hold the pipeline until the actors are up: decode cannot run ahead during start-up
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = 600
    ctx.enable_progress_bars = False
    try:
        sampler = RssSampler() if measure_rss else None
        if sampler:
            sampler.__enter__()
        first = None
        if small is not None:  # a 1-image run first absorbs the session's one-off start-up
            label_instances(small["warmup"]["instances"], small["warmup"]["images"], checkpoint,
                            out + "-warmup", crop, cfg)  # fmt: skip
            first = label_instances(small["instances"], small["images"], checkpoint, out + "-small",
                                    crop, cfg)  # fmt: skip
        s = label_instances(ds["instances"], ds["images"], checkpoint, out, crop, cfg)
        if sampler:
            sampler.__exit__(None, None, None)
    finally:
        ray.shutdown()
    result = {
        "crops": s["crops"],
        "seconds": s["seconds"],
        "first_result_s": s["first_result_s"],
        "commit_s": s.get("commit_s"),
        "e2e_crops_per_s": s["crops_per_s"],
    }
    if first is not None:
        extra_s, extra = s["seconds"] - first["seconds"], s["crops"] - first["crops"]
        result["small"] = {k: first[k] for k in ("crops", "seconds", "first_result_s")}
        result["incremental_crops_per_s"] = round(extra / extra_s, 3) if extra_s > 0 else None
    if sampler:
        result["peak_rss_mb"] = round(sampler.peak / 2**20, 1)  # driver + workers
        result["peak_private_mb"] = round(sampler.peak_private / 2**20, 1)
        result["processes_at_peak"] = sampler.names_at_peak
        result["peak_rss_all_mb"] = round(sampler.peak_all / 2**20, 1)  # + Ray daemons
        result["max_worker_processes"] = sampler.max_workers
    return result


def pool_config(spec: str, batch_size: int) -> LabelConfig:
    """``"AxC"``: A actors x C CPUs each; decode/paste tasks get the cores left over."""
    actors, cpus = spec.split("x")
    n, c = int(actors), float(cpus)
    left = CORES - n * c
    if left <= 0:
        raise ValueError(f"pool {spec} leaves no CPU of {CORES} for decode/paste")
    return LabelConfig(batch_size=batch_size, num_actors=n, cpus_per_actor=c,
                       cpus_per_task=left, images_per_block=8)  # fmt: skip


def throughput(root: str, make, num_images: int, checkpoint: str, crop: CropConfig,
               pools: dict[str, LabelConfig], runs: int) -> dict:  # fmt: skip
    """``runs`` rounds of: bare loop, every pool. Median ratio per pool and its spread.
    ``make(n)``: the dataset of n images ({"images", "instances"})."""
    ds = make(num_images)
    small = make(max(1, num_images // 3))
    small["warmup"] = make(1)
    print(f"[bench] {num_images} images, {ds['instances'].num_rows} instances "
          f"(subset {small['instances'].num_rows}), {CORES} cores", flush=True)  # fmt: skip
    first = next(iter(pools.values()))
    rounds = []
    for r in range(runs):
        bare = bare_loop(ds["instances"], ds["images"], checkpoint, crop, first)
        print(f"[bench] round {r}: bare loop {bare}", flush=True)
        entry = {"bare": bare, "pools": {}}
        for name, cfg in pools.items():
            res = ray_run(ds, checkpoint, os.path.join(root, f"run{r}-{name}"), crop, cfg,
                          small=small)  # fmt: skip
            rate = res["incremental_crops_per_s"]
            # above cores x the one-core loop is impossible: the start-up swing exceeded the
            # extra work (a loaded machine); such a round gives no ratio
            if rate and rate > 1.5 * CORES * bare["crops_per_s"]:
                res["unreliable"], rate = True, None
            res["ratio"] = round(rate / bare["crops_per_s"], 3) if rate else None
            print(f"[bench] round {r}: pool {name}: {res}", flush=True)
            entry["pools"][name] = res
        rounds.append(entry)
    summary = {}
    for name in pools:
        ratios = [e["pools"][name]["ratio"] for e in rounds if e["pools"][name]["ratio"]]
        rates = [e["pools"][name]["incremental_crops_per_s"] for e in rounds]
        e2e = [e["pools"][name]["e2e_crops_per_s"] for e in rounds]
        first = [e["pools"][name]["first_result_s"] for e in rounds]
        summary[name] = {
            "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_spread": [min(ratios), max(ratios)] if ratios else None,
            "crops_per_s_median": round(statistics.median([x for x in rates if x] or [0]), 2),
            # what a user's run of that size sees: actor start-up and fill included
            "e2e_crops_per_s_median": round(statistics.median(e2e), 2),
            "first_result_s_median": round(statistics.median([x for x in first if x is not None] or [0]), 2),
        }  # fmt: skip
    bare_rates = [e["bare"]["crops_per_s"] for e in rounds]
    best = max(summary, key=lambda k: summary[k]["ratio_median"] or 0)
    return {
        "instances": ds["instances"].num_rows,
        "best_pool": best,
        "best_ratio_median": summary[best]["ratio_median"],
        "pools": summary,
        "bare_crops_per_s_median": round(statistics.median(bare_rates), 2),
        "bare_split_s": rounds[-1]["bare"]["split_s"],
        # the quality score's seconds over the bare loop's (goal <= 10 %), median and spread
        "score_share_median": statistics.median(e["bare"]["score_share"] for e in rounds),
        "score_share_spread": [
            min(e["bare"]["score_share"] for e in rounds),
            max(e["bare"]["score_share"] for e in rounds),
        ],
        "rounds": rounds,
    }


def save_generator(path: str, name: str, size: int) -> None:
    """A randomly initialised generator (same compute as trained weights, nothing to fetch)."""
    kw = {"img_size": size}
    if "pretrained" in inspect.signature(GENERATORS[name]).parameters:
        kw["pretrained"] = False
    save_model(path, build_generator(name, **kw), name, "generator", kw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=SYNTHETIC,
                   help="synthetic (default), or real photos: a profile name (coco_mini) or a "
                        "directory with instances*.json and images/")  # fmt: skip
    p.add_argument("--images", type=int, default=120, help="images for the throughput runs")
    p.add_argument("--runs", type=int, default=3, help="rounds; the median ratio is reported")
    p.add_argument("--pools", default="1x1,1x1.5,2x0.75",
                   help="comma-separated AxC: A actors x C CPUs each (within the real cores)")  # fmt: skip
    p.add_argument("--rss-images", type=int, default=20, help="base images for the RSS runs")
    p.add_argument("--scale", type=int, default=10, help="dataset growth for the RSS runs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rss-only", action="store_true", help="skip the throughput runs")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS runs")
    p.add_argument("--generator", default="vit_small_dinov2", help="GENERATORS key")
    p.add_argument("--crop-size", type=int, default=224)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make = None
    if args.data != SYNTHETIC:
        found = find_photos(args.data)
        if found is None:
            result = {"skipped": f"real-photo data {args.data!r} not found", "data": args.data}
            print(f"[bench] skipped: {result['skipped']}", flush=True)
            print(json.dumps(result))
            return result
        make = Photos(found["annotations"], found["images"]).subset
        make(args.images)  # too many images: a clear error before any model work
        if not args.no_rss:
            print("[bench] real photos: RSS runs skipped (synthetic only)", flush=True)
            args.no_rss = True
    root = tempfile.mkdtemp(prefix="exits-bench-label-")
    if make is None:
        make = lambda n: make_dataset(root, n)  # noqa: E731
    torch.manual_seed(0)
    checkpoint = os.path.join(root, "generator.pt")
    size = args.crop_size
    save_generator(checkpoint, args.generator, size)
    crop = CropConfig(size=size)
    pools = {spec: pool_config(spec, args.batch_size) for spec in args.pools.split(",")}
    out: dict = {}
    if not args.rss_only:
        out = throughput(root, make, args.images, checkpoint, crop, pools, args.runs)
    rss: dict = {}
    if not args.no_rss:
        rss_cfg = next(iter(pools.values()))
        small = make_dataset(root, args.rss_images)
        big = make_dataset(root, args.rss_images * args.scale)
        rss_small = ray_run(small, checkpoint, os.path.join(root, "rss1"), crop, rss_cfg, True)
        print(f"[bench] rss {args.rss_images} images: {rss_small}", flush=True)
        rss_big = ray_run(big, checkpoint, os.path.join(root, "rss10"), crop, rss_cfg, True)
        print(f"[bench] rss {args.rss_images * args.scale} images: {rss_big}", flush=True)
        rss = {
            "rss_growth": round(rss_big["peak_rss_mb"] / rss_small["peak_rss_mb"] - 1.0, 3),
            "private_growth": round(rss_big["peak_private_mb"] / rss_small["peak_private_mb"] - 1, 3),
            "rss_small": {"images": args.rss_images, **rss_small},
            "rss_big": {"images": args.rss_images * args.scale, **rss_big},
        }  # fmt: skip
    result = {
        **{k: out.get(k) for k in ("best_pool", "best_ratio_median")},
        **{k: rss.get(k) for k in ("rss_growth", "private_growth")},
        **out,
        **rss,
        "data": args.data,
        "generator": args.generator,
        "crop_size": size,
        "batch_size": args.batch_size,
        "cores": CORES,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
