"""Stage 1c throughput and memory: the Ray Data pipeline vs a bare single-process loop.

Usage::

    python bench/label_throughput.py [--images 240] [--scale 10] [--batch-size 16]

Workload: the synthetic demo set (128² images, 2-4 instances each), a randomly initialised
``vit_tiny_demo`` generator at 96² crops, on CPU. Both sides run the same code on the same
images: ``exits.label.crop_images`` (decode + crop), ``MaskPredictor.predict`` (model) and
``paste_masks`` (sigmoid, paste, threshold, RLE).

- bare loop: one process, one torch thread, no Ray;
- Ray pipeline: ``label_instances`` with 1 actor (Ray started with 2 logical CPUs: the actor
  plus one for the decode/paste tasks) and 2 actors (3 logical CPUs on this 2-core box).
  The pipeline is held until the actors are up (``DataContext.wait_for_min_actors_s``), so
  ``steady`` rates (after the first result) exclude worker/actor start-up and model load
  without letting decode run ahead meanwhile; ``e2e`` rates include the start-up.
- memory: peak RSS summed over the driver and the Ray worker processes (tasks, actors),
  sampled every 0.2 s, for N and scale x N images (1 actor); Ray's daemons reported apart.

Prints progress, then one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from exits.checkpoints import save_model  # noqa: E402
from exits.config import CropConfig, LabelConfig  # noqa: E402
from exits.data.coco import load_instances  # noqa: E402
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
from exits.model.generator import build_generator  # noqa: E402

CROP_SIZE = 96
OBJECT_STORE = 300 * 1024**2
RAY_DAEMONS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # besides raylet, gcs_server, ...


def make_dataset(root: str, num_images: int) -> dict:
    data = write_demo_dataset(os.path.join(root, f"demo{num_images}"), num_images=num_images,
                              image_size=128, seed=0, val_fraction=0.0)  # fmt: skip
    instances, errors = load_instances(data["annotations"], data["images"], check_files=False)
    assert errors.num_rows == 0
    return {"images": data["images"], "instances": instances}


def bare_loop(instances, images: str, checkpoint: str, crop: CropConfig, cfg: LabelConfig) -> dict:
    """The same decode+crop, model and paste work in one process, no Ray."""
    torch.set_num_threads(1)
    predictor = MaskPredictor(checkpoint, crop_size=crop.size)
    rows = image_rows(assign_shards(read_instances(instances), 1 << 30))
    t0, n = time.time(), 0
    pending: dict[str, list] = {}

    def flush(batch: dict[str, np.ndarray]) -> int:
        crops = batch.pop("crop")
        batch["logits"] = predictor.predict(crops)
        batch["generator"] = np.full(len(crops), predictor.generator_id, dtype=object)
        return paste_masks(batch, threshold=cfg.threshold).num_rows

    for i in range(0, rows.num_rows, cfg.images_per_block):
        out = crop_images(rows.slice(i, cfg.images_per_block), images=images, size=crop.size,
                          enlarge=crop.inference_enlarge)  # fmt: skip
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
    return {"crops": n, "seconds": round(seconds, 2), "crops_per_s": round(n / seconds, 2)}


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


def ray_run(ds: dict, checkpoint: str, out: str, crop: CropConfig, cfg: LabelConfig, num_cpus: int,
            measure_rss: bool = False) -> dict:  # fmt: skip
    import ray
    import ray.data

    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=OBJECT_STORE,
        include_dashboard=False,
    )
    # hold the pipeline until the actors are up: decode cannot run ahead during start-up, so
    # the time after the first result is a fair steady state
    ray.data.DataContext.get_current().wait_for_min_actors_s = 600
    try:
        sampler = RssSampler() if measure_rss else None
        if sampler:
            sampler.__enter__()
        s = label_instances(ds["instances"], ds["images"], checkpoint, out, crop, cfg)
        if sampler:
            sampler.__exit__(None, None, None)
    finally:
        ray.shutdown()
    steady = s["seconds"] - (s["first_result_s"] or 0.0)
    result = {
        "crops": s["crops"],
        "seconds": s["seconds"],
        "first_result_s": s["first_result_s"],
        "e2e_crops_per_s": s["crops_per_s"],
        "steady_crops_per_s": round(s["crops"] / steady, 2) if steady > 0 else None,
    }
    if sampler:
        result["peak_rss_mb"] = round(sampler.peak / 2**20, 1)  # driver + workers
        result["peak_private_mb"] = round(sampler.peak_private / 2**20, 1)
        result["processes_at_peak"] = sampler.names_at_peak
        result["peak_rss_all_mb"] = round(sampler.peak_all / 2**20, 1)  # + Ray daemons
        result["max_worker_processes"] = sampler.max_workers
    return result


def throughput(
    root: str, num_images: int, checkpoint: str, crop: CropConfig, cfg1: LabelConfig,
    cfg2: LabelConfig,
) -> dict:  # fmt: skip
    """Bare loop (before and after, the box is shared), Ray with 1 and 2 actors."""
    ds = make_dataset(root, num_images)
    print(f"[bench] {num_images} images, {ds['instances'].num_rows} instances", flush=True)
    bare = bare_loop(ds["instances"], ds["images"], checkpoint, crop, cfg1)
    print(f"[bench] bare loop: {bare}", flush=True)
    one = ray_run(ds, checkpoint, os.path.join(root, "run1"), crop, cfg1, num_cpus=2)
    print(f"[bench] ray 1 actor: {one}", flush=True)
    two = ray_run(ds, checkpoint, os.path.join(root, "run2"), crop, cfg2, num_cpus=3)
    print(f"[bench] ray 2 actors: {two}", flush=True)
    bare_again = bare_loop(ds["instances"], ds["images"], checkpoint, crop, cfg1)
    print(f"[bench] bare loop again: {bare_again}", flush=True)
    bare_rate = (bare["crops_per_s"] + bare_again["crops_per_s"]) / 2

    def ratio(a: float | None) -> float | None:
        return round(a / bare_rate, 3) if a else None

    return {
        "ratio_1_actor": ratio(one["steady_crops_per_s"]),
        "ratio_2_actors": ratio(two["steady_crops_per_s"]),
        "ratio_1_actor_e2e": ratio(one["e2e_crops_per_s"]),
        "ratio_2_actors_e2e": ratio(two["e2e_crops_per_s"]),
        "bare_crops_per_s": round(bare_rate, 2),
        "bare_runs": [bare, bare_again],
        "ray_1_actor": one,
        "ray_2_actors": two,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=240, help="images for the throughput runs")
    p.add_argument("--rss-images", type=int, default=60, help="base images for the RSS runs")
    p.add_argument("--scale", type=int, default=10, help="dataset growth for the RSS runs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rss-only", action="store_true", help="skip the throughput runs")
    p.add_argument("--generator", default="vit_tiny_demo", help="GENERATORS key")
    p.add_argument("--crop-size", type=int, default=CROP_SIZE)
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="exits-bench-label-")
    torch.manual_seed(0)
    checkpoint = os.path.join(root, "generator.pt")
    size = args.crop_size
    save_model(checkpoint, build_generator(args.generator, img_size=size), args.generator,
               "generator", {"img_size": size})  # fmt: skip
    crop = CropConfig(size=size)
    cfg1 = LabelConfig(batch_size=args.batch_size, num_actors=1, images_per_block=8)
    cfg2 = LabelConfig(batch_size=args.batch_size, num_actors=2, images_per_block=8)
    out: dict = {}
    if not args.rss_only:
        out = throughput(root, args.images, checkpoint, crop, cfg1, cfg2)

    small = make_dataset(root, args.rss_images)
    big = make_dataset(root, args.rss_images * args.scale)
    rss_small = ray_run(
        small, checkpoint, os.path.join(root, "rss1"), crop, cfg1, 2, measure_rss=True
    )
    print(f"[bench] rss {args.rss_images} images: {rss_small}", flush=True)
    rss_big = ray_run(big, checkpoint, os.path.join(root, "rss10"), crop, cfg1, 2, measure_rss=True)
    print(f"[bench] rss {args.rss_images * args.scale} images: {rss_big}", flush=True)

    print(json.dumps({
        **{k: out.get(k) for k in ("ratio_1_actor", "ratio_2_actors")},
        "rss_growth": round(rss_big["peak_rss_mb"] / rss_small["peak_rss_mb"] - 1.0, 3),
        "private_growth": round(rss_big["peak_private_mb"] / rss_small["peak_private_mb"] - 1, 3),
        **out,
        "rss_small": {"images": args.rss_images, **rss_small},
        "rss_big": {"images": args.rss_images * args.scale, **rss_big},
        "generator": args.generator,
        "crop_size": size,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
