"""GPU check: labelling crops/s/GPU at bf16, FLOP utilisation, the Ray Data labeller end to end
and the Ray Train stage-1b step time, in one JSON (run by ``bench/gpu_check.sh``).

Usage::

    bash bench/gpu_check.sh                      # GPU machine, < 8 min; JSON to $OUT or .
    bash bench/gpu_check.sh --dry-run            # CPU, tiny sizes, the same code paths (CI)
    python bench/gpu_check.py --budget-s 420 --out gpu_check.json

Sections, in order (each skipped with a reason once ``--budget-s`` is spent):

- ``model``: the labeller's exact call, ``exits.inference.predict_logits`` (bf16 autocast on
  CUDA), on uint8 crops already on the GPU, for DINOv2 ViT-S/14 at 224² and the paper's ViT-B/16
  at 512² (random weights: the same compute, nothing to download). crops/s, GFLOP per crop
  (``torch.utils.flop_counter``, one forward), achieved TFLOP/s and its share of the device's
  dense bf16 peak (``--peak-tflops`` or a table by device name). Goals: >= 1,500 crops/s/GPU at
  ViT-B/16 512², >= 40 % of the FLOP limit.
- ``label``: ``exits.label.label_instances`` (decode/crop tasks -> one GPU actor -> paste/RLE
  tasks -> commit) on a synthetic set with ViT-S/14 224²: steady crops/s.
- ``train_1b``: ``exits.train.run.fit`` of stage 1b (student + EMA teacher, bilateral
  retrieval, torch CRF; bf16 autocast) on one Ray Train GPU worker: median step time after
  warm-up steps.

``--dry-run`` runs every section on CPU at tiny sizes (crops 56²/64², a few images and steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from exits.inference import predict_logits  # noqa: E402
from exits.model.generator import build_generator  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0}  # fmt: skip
# (generator, crop size, batch) on GPU / in the dry run
MODELS = {"vit_small_dinov2_224": ("vit_small_dinov2", 224, 256),
          "vit_base_mae_512": ("vit_base_mae", 512, 64)}  # fmt: skip
DRY_MODELS = {"vit_small_dinov2_224": ("vit_small_dinov2", 56, 2),
              "vit_base_mae_512": ("vit_base_mae", 64, 2)}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def forward_flops(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """FLOPs of one crop's forward (matmuls/convs, as torch's flop counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    crops = torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as counter:
        predict_logits(model, crops, device)
    return float(counter.get_total_flops())


def bench_model(name: str, size: int, batch: int, seconds: float, device: torch.device,
                peak: float | None) -> dict:  # fmt: skip
    model = build_generator(name, img_size=size, pretrained=False).to(device).eval()
    flops = forward_flops(model, size, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    crops = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    crops = crops.to(device)
    for _ in range(2):  # warm-up (cuDNN/cuBLAS autotuning, allocator)
        predict_logits(model, crops, device)
    _sync(device)
    t0, iters = time.perf_counter(), 0
    while iters < 3 or time.perf_counter() - t0 < seconds:
        predict_logits(model, crops, device)
        iters += 1
        if device.type == "cuda" and iters % 5:
            continue
        _sync(device)
    _sync(device)
    dt = time.perf_counter() - t0
    rate = iters * batch / dt
    achieved = rate * flops / 1e12
    out = {"generator": name, "crop_size": size, "batch": batch, "iters": iters,
           "crops_per_s": round(rate, 1), "gflop_per_crop": round(flops / 1e9, 2),
           "achieved_tflops": round(achieved, 2), "peak_tflops": peak,
           "flop_utilisation": round(achieved / peak, 3) if peak else None}  # fmt: skip
    del model, crops
    if device.type == "cuda":
        out["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.empty_cache()
    return out


def make_data(root: str, num_images: int) -> dict:
    from exits.data.coco import load_instances, write_table
    from exits.data.synthetic import write_demo_dataset

    data = write_demo_dataset(os.path.join(root, "data"), num_images=num_images, image_size=128,
                              seed=0, val_fraction=0.0)  # fmt: skip
    table, _ = load_instances(data["annotations"], data["images"], check_files=False)
    uri = os.path.join(root, "instances.parquet")
    write_table(table, uri)
    return {"images": data["images"], "table": table, "uri": uri}


def bench_label(data: dict, root: str, size: int, use_gpu: bool) -> dict:
    from exits.checkpoints import save_model
    from exits.config import CropConfig, LabelConfig
    from exits.label import label_instances

    ckpt = os.path.join(root, "label_generator.pt")
    kw = {"img_size": size, "pretrained": False}
    save_model(ckpt, build_generator("vit_small_dinov2", **kw), "vit_small_dinov2", "generator", kw)
    cfg = LabelConfig(batch_size=128 if use_gpu else 4, num_actors=1, use_gpu=use_gpu,
                      gpus_per_actor=1.0 if use_gpu else 0.0, images_per_block=16)  # fmt: skip
    s = label_instances(data["table"], data["images"], ckpt, os.path.join(root, "label_run"),
                        CropConfig(size=size), cfg)  # fmt: skip
    steady = s["seconds"] - (s["first_result_s"] or 0.0)  # after the first result batch
    steady_crops = s["crops"] - s.get("first_result_rows", 0)
    return {"generator": "vit_small_dinov2", "crop_size": size, "crops": s["crops"],
            "seconds": s["seconds"], "first_result_s": s["first_result_s"],
            "steady_crops_per_s": round(steady_crops / steady, 1) if steady > 0 and steady_crops > 0 else None,
            "e2e_crops_per_s": s["crops_per_s"]}  # fmt: skip


def bench_train_1b(data: dict, root: str, size: int, batch: int, steps: int, use_gpu: bool) -> dict:
    from exits.config import CropConfig, LossConfig, ModelConfig, RetrievalConfig, TrainConfig
    from exits.train.loops import loop_config
    from exits.train.run import fit, history_from_result

    enc = os.path.join(root, "encoder_random.pt")  # random ViT-S/14 weights in timm layout
    torch.save(build_generator("vit_small_dinov2", img_size=size, pretrained=False)
               .encoder.vit.state_dict(), enc)  # fmt: skip
    tcfg = TrainConfig(epochs=1000, max_steps=steps, batch_size=batch, lr=1e-4, scale_lr=False,
                       num_workers=1, use_gpu=use_gpu, max_failures=0,
                       checkpoint_every=10**6)  # fmt: skip
    loop = loop_config(
        "generator", data["uri"], data["images"], CropConfig(size=size),
        ModelConfig(generator="vit_small_dinov2", encoder_checkpoint=enc),
        RetrievalConfig(similarity="bilateral"), LossConfig(crf="torch", balanced_bce=1.0), tcfg,
        loader_workers=4 if use_gpu else 0,
    )  # fmt: skip
    t0 = time.time()
    result = fit(loop, tcfg, os.path.join(root, "train_1b"), name="gpu_check")
    if result.error is not None:
        raise RuntimeError(f"1b failed: {result.error}")
    hist = history_from_result(result)
    rates = [h["samples_per_s"] for h in hist[2:]] or [h["samples_per_s"] for h in hist]
    rate = statistics.median(rates)
    return {"generator": "vit_small_dinov2", "crop_size": size, "batch": batch, "steps": len(hist),
            "step_s_median": round(batch / rate, 4), "samples_per_s_median": round(rate, 1),
            "wall_s": round(time.time() - t0, 1), "similarity": "bilateral"}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same code paths")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json or ./)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip sections after this")
    p.add_argument("--model-seconds", type=float, default=20.0, help="timing per model")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak override")
    args = p.parse_args(argv)

    t_start = time.time()
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if not dry and device.type != "cuda":
        raise SystemExit("gpu_check: no CUDA device (use --dry-run on CPU)")
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "gpu_check.json")
    result: dict = {"dry_run": dry, "device": str(device), "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "sections": {}}  # fmt: skip
    peak = peak_tflops(device, args.peak_tflops)

    def run(name: str, fn) -> None:
        left = args.budget_s - (time.time() - t_start)
        if left <= 0:
            result["sections"][name] = {"skipped": "time budget spent"}
            return
        t = time.time()
        try:
            result["sections"][name] = {**fn(), "section_s": round(time.time() - t, 1)}
        except Exception as e:  # record and continue: one JSON with whatever was measured
            result["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[gpu_check] {name}: {result['sections'][name]}", flush=True)
        with open(out_path, "w") as f:  # written after every section: a timeout keeps the rest
            json.dump(result, f, indent=1)

    secs = 0.5 if dry else args.model_seconds
    for key, (gen, size, batch) in (DRY_MODELS if dry else MODELS).items():
        run(f"model_{key}", lambda g=gen, s=size, b=batch: bench_model(g, s, b, secs, device, peak))

    import ray

    root = tempfile.mkdtemp(prefix="exits-gpu-check-")
    data = make_data(root, 4 if dry else 400)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             num_cpus=2 if dry else None)  # fmt: skip
    try:
        run("label", lambda: bench_label(data, root, 56 if dry else 224, not dry))
        run("train_1b", lambda: bench_train_1b(data, root, 56 if dry else 224, 2 if dry else 32,
                                               3 if dry else 30, not dry))  # fmt: skip
    finally:
        ray.shutdown()
    result["wall_s"] = round(time.time() - t_start, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
