"""GPU check on the bare GPU image: inference speed, stage-1b step time and whether fine-tuning
the whole encoder lifts real-photo masks, in one JSON (run by ``bench/gpu_check.sh``).

Usage::

    bash bench/gpu_check.sh                      # GPU machine, < 8 min (recipe: bench/README.md)
    bash bench/gpu_check.sh --dry-run            # CPU, tiny sizes, the same code paths (CI)
    python bench/gpu_check.py --prepare-carry --wheel pycocotools-…-cp312-….whl   # fill data_carry/

The image has torch, timm, numpy, pyarrow, scipy, opencv, pillow; no Ray, mmcv, mmdet, mmengine or
pycocotools. Stage 1 runs in this process (``exits.train.local``: the Ray Train loop's own step);
pycocotools comes as a carried wheel (the instance table's RLE and the mIoU need it). Sections,
in order; the JSON is rewritten after each, and one that did not run says why under ``skipped``:

- ``model``: ``exits.inference.predict_logits`` (bf16 autocast on CUDA) on uint8 crops already on
  the device, DINOv2 ViT-S/14 at 224² and the paper's ViT-B/16 at 512² (random weights: the same
  compute): crops/s, GFLOP per crop (``torch.utils.flop_counter``), achieved TFLOP/s, share of the
  dense bf16 peak (``--peak-tflops`` or by device name), peak GPU memory.
- ``train_1b``: stage-1b steps of the coco_mini recipe with the whole encoder trainable
  (``model.trainable_blocks: -1``) at ``--train-batch`` crops, bf16: median step time (after
  warm-up steps), samples/s with data loading, peak memory; the 1a warm-up step too.
- ``quality``: coco_mini (``bench/quality.py --data coco_mini``'s split: 96 photos train, 32 held
  out) trained as the profile says (frozen encoder, token cache) and with the whole encoder
  fine-tuned for as many epochs as fit in ``--finetune-s``; the held-out photos' mIoU (all /
  separated) of both.
- ``label`` (needs Ray): ``exits.label.label_instances`` end to end on a synthetic set.

``--dry-run``: CPU, crops 56²/64², a few instances and steps, random ViT-S weights through the
carried-weights path (fp16, gzip).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from exits.inference import predict_logits  # noqa: E402
from exits.model.generator import build_generator  # noqa: E402

CARRY = os.path.join(REPO, "data_carry")  # git-ignored: what travels beside the repo
CARRY_COCO = os.path.join(CARRY, "coco_train128")
SHARED_COCO = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_train128")
CARRY_WEIGHTS = os.path.join(CARRY, "weights", "vit_small_dinov2_imgfocus.fp16.pt.gz")
CARRY_WHEELS = os.path.join(CARRY, "wheels")
CARRY_LIMIT_MIB = 64  # what travels with one command to the GPU machine, repo included
# dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0}  # fmt: skip
# (generator, crop size, batch) on GPU / in the dry run
MODELS = {"vit_small_dinov2_224": ("vit_small_dinov2", 224, 256),
          "vit_base_mae_512": ("vit_base_mae", 512, 64)}  # fmt: skip
DRY_MODELS = {"vit_small_dinov2_224": ("vit_small_dinov2", 56, 2),
              "vit_base_mae_512": ("vit_base_mae", 64, 2)}  # fmt: skip
# the frozen-encoder figure measured on the 2-core CPU (docs/benchmarks.md, coco_mini profile)
CPU_FROZEN_HELDOUT = {"all": 0.664, "separated": 0.453}
DRY_CROP = 56  # multiple of 14: a 4 x 4 patch grid
RAY_SECTIONS = ("label",)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def importable(name: str) -> bool:
    """Whether ``name`` could be imported (found, not imported: mmdet takes seconds)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing(*modules: str) -> str | None:
    """None when every module imports, else why the first one does not."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            return f"{name} not importable ({e})"
    return None


def strict_json(obj):
    """``obj`` with NaN/inf floats as None (an mIoU over no separated instance is NaN)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------------- model
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
    """crops/s of ``predict_logits`` on (batch, size, size, 3) uint8 crops on ``device``."""
    _reset_peak(device)
    model = build_generator(name, img_size=size, pretrained=False).to(device).eval()
    flops = forward_flops(model, size, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    crops = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    crops = crops.to(device)
    with torch.inference_mode():
        for _ in range(2):  # warm-up (cuDNN/cuBLAS autotuning, allocator)
            predict_logits(model, crops, device)
        _sync(device)
        t0, iters = time.perf_counter(), 0
        while iters < 3 or time.perf_counter() - t0 < seconds:
            predict_logits(model, crops, device)
            iters += 1
            if iters % 5 == 0:
                _sync(device)
        _sync(device)
    dt = time.perf_counter() - t0
    rate = iters * batch / dt
    achieved = rate * flops / 1e12
    out = {"generator": name, "crop_size": size, "batch": batch, "iters": iters,
           "crops_per_s": round(rate, 1), "gflop_per_crop": round(flops / 1e9, 2),
           "achieved_tflops": round(achieved, 2), "peak_tflops": peak,
           "flop_utilisation": round(achieved / peak, 3) if peak else None,
           "max_memory_gb": _peak_gb(device)}  # fmt: skip
    del model, crops
    return out


# ------------------------------------------------------------------------- data and weights
def pack_weights(src: str, dst: str) -> dict:
    """A timm state dict -> fp16, gzip (88 MB fp32 -> ~39 MiB: fits the 64 MiB carry)."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(half, buf)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with gzip.open(dst, "wb", compresslevel=6) as f:
        f.write(buf.getvalue())
    return {"tensors": len(half), "bytes": os.path.getsize(dst)}


def unpack_weights(src: str, dst: str) -> str:
    """``pack_weights``' file -> a float32 state dict at ``dst`` (``model.encoder_checkpoint``)."""
    with gzip.open(src, "rb") as f:
        half = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in half.items()}, dst)
    return dst


def find_coco(arg: str | None) -> str | None:
    """coco_train128: ``--coco`` (""= none), else the carried copy, else ../shared."""
    if arg is not None:
        return arg or None
    for d in (CARRY_COCO, SHARED_COCO):
        if os.path.exists(os.path.join(d, "instances_train2017.json")):
            return d
    return None


@functools.cache
def _bench_quality_module():
    """bench/quality.py (its split rule, its summary), imported by path."""
    spec = importlib.util.spec_from_file_location(
        "bench_quality", os.path.join(REPO, "bench", "quality.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def profile(coco: str | None, root: str, dry: bool):
    """The coco_mini profile on coco_train128 (or, without it, on a 16-image synthetic set with
    4 held out), with the held-out split of ``bench/quality.py --data coco_mini``."""
    from exits.config import load_config

    if coco is not None:
        ann, images, hold, source = (os.path.join(coco, "instances_train2017.json"),
                                     os.path.join(coco, "images"), 32, "coco_train128")  # fmt: skip
    else:
        from exits.data.synthetic import write_demo_dataset

        demo = write_demo_dataset(os.path.join(root, "demo"), num_images=16, image_size=96,
                                  seed=0, val_fraction=0.0)  # fmt: skip
        ann, images, hold, source = demo["annotations"], demo["images"], 4, "synthetic"
    sets = [f"data.annotations={ann}", f"data.images={images}", f"data.holdout_images={hold}"]
    if dry:
        sets.append(f"crop.size={DRY_CROP}")
    return load_config("coco_mini", sets), source


def make_data(coco: str | None, root: str, dry: bool) -> dict:
    """Train / held-out instance tables of the profile's split (dry run: 16 / 4 instances)."""
    from exits.data.coco import write_table
    from exits.data.prepare import load_instances

    cfg, source = profile(coco, root, dry)
    paths = _bench_quality_module().real_photo_split(cfg, "heldout", os.path.join(root, "split"))
    train, _ = load_instances(paths["annotations"], paths["images"])
    val, _ = load_instances(paths["val_annotations"], paths["images"])
    if dry:
        train, val = train.slice(0, 16), val.slice(0, 4)
    uri = os.path.join(root, "instances.parquet")
    write_table(train, uri)
    with open(paths["annotations"]) as f:
        train_images = len(json.load(f)["images"])
    with open(paths["val_annotations"]) as f:
        val_images = len(json.load(f)["images"])
    return {"cfg": cfg, "source": source, "uri": uri, "images": paths["images"], "train": train,
            "val": val, "train_images": train_images, "val_images": val_images}  # fmt: skip


# ------------------------------------------------------------------------------ stage 1
def one_device(tc, device: torch.device, **changes):
    """A profile's W workers x B crops as one worker x (W * B): the same step, one device."""
    one = {"batch_size": tc.batch_size * tc.num_workers, "num_workers": 1,
           "use_gpu": device.type == "cuda"}  # fmt: skip
    return replace(tc, **{**one, **changes})


def run_stage(stage: str, cfg, data: dict, tc, device: torch.device, out: str,
              extractor: str | None = None, loader_workers: int = 0,
              max_seconds: float | None = None):  # fmt: skip
    from exits.train.local import fit_local
    from exits.train.loops import loop_config

    loop = loop_config(stage, data["uri"], data["images"], cfg.crop, cfg.model, cfg.retrieval,
                       cfg.loss, tc, extractor_checkpoint=extractor,
                       loader_workers=loader_workers)  # fmt: skip
    return fit_local(loop, device, out=out, max_seconds=max_seconds)


def step_stats(history: list[dict], skip: int) -> dict:
    """Medians after the first ``skip`` steps (warm-up: autotuning, allocator, loader start)."""
    rows = history[skip:] if len(history) > skip else history[-1:]
    return {"steps": len(history), "step_s_median": round(statistics.median(h["step_s"] for h in rows), 4),
            "samples_per_s_median": round(statistics.median(h["samples_per_s"] for h in rows), 1)}  # fmt: skip


def random_encoder(root: str, size: int) -> str:
    """Random ViT-S/14 weights in timm layout (timing needs no pretrained weights)."""
    path = os.path.join(root, "encoder_random.pt")
    vit = build_generator("vit_small_dinov2", img_size=size, pretrained=False).encoder.vit
    torch.save(vit.state_dict(), path)
    return path


def bench_train_1b(data: dict, root: str, device: torch.device, dry: bool, batch: int,
                   steps: int, loader_workers: int) -> dict:  # fmt: skip
    """1a warm-up steps (the 1b extractor), then 1b with the whole encoder trainable."""
    cfg = data["cfg"]
    enc = random_encoder(root, cfg.crop.size)
    cfg = replace(cfg, model=replace(cfg.model, encoder_checkpoint=enc, trainable_blocks=-1))
    kw = {"batch_size": batch, "num_workers": 1, "epochs": 1000, "checkpoint_every": 10**6}
    skip = 1 if dry else 5
    _reset_peak(device)
    t = time.time()
    wtc = one_device(cfg.warmup, device, **kw, max_steps=2 if dry else skip + 5)
    w = run_stage("warmup", cfg, data, wtc, device, os.path.join(root, "t1b_warmup"),
                  loader_workers=loader_workers)  # fmt: skip
    warm = {**step_stats(w.history, skip), "wall_s": round(time.time() - t, 1)}
    _reset_peak(device)
    t = time.time()
    gtc = one_device(cfg.generator, device, **kw, cache_views=0, max_steps=steps)
    g = run_stage("generator", cfg, data, gtc, device, os.path.join(root, "t1b_generator"),
                  w.model_uri, loader_workers)  # fmt: skip
    return {"generator": cfg.model.generator, "crop_size": cfg.crop.size, "batch": batch,
            "trainable_blocks": -1, "bf16": device.type == "cuda", "data": data["source"],
            "similarity": cfg.retrieval.similarity, **step_stats(g.history, skip),
            "max_memory_gb": _peak_gb(device), "wall_s": round(time.time() - t, 1),
            "warmup_1a": warm}  # fmt: skip


def evaluate(model, data: dict, device: torch.device) -> dict:
    from exits.evaluate.quality import evaluate_generator

    cfg = data["cfg"]
    res = evaluate_generator(model, data["val"], data["images"], cfg.crop.size,
                             cfg.crop.inference_enlarge, cfg.label.threshold, device=str(device),
                             batch_size=64 if device.type == "cuda" else 8)  # fmt: skip
    return _bench_quality_module().summarise(res)


def bench_quality(data: dict, root: str, device: torch.device, dry: bool, encoder: str,
                  finetune_s: float, encoder_lr_scale: float, max_epochs: int,
                  loader_workers: int, partial: dict, save) -> dict:  # fmt: skip
    """Frozen-encoder recipe vs whole-encoder fine-tuning on the held-out photos; ``partial``
    collects each part as it finishes (``save()`` rewrites the JSON), so a later failure or
    timeout keeps the earlier figures."""
    cfg = data["cfg"]
    cfg = replace(cfg, model=replace(cfg.model, encoder_checkpoint=encoder))
    dry_kw = {"max_steps": 2, "batch_size": 2} if dry else {}
    val_sep = sum(bool(s) for s in data["val"]["separated"].to_pylist())
    partial.update(data=data["source"], train_images=data["train_images"],
                   heldout_images=data["val_images"], train_instances=data["train"].num_rows,
                   val_instances=data["val"].num_rows, val_separated=val_sep,
                   generator=cfg.model.generator, crop_size=cfg.crop.size,
                   cpu_frozen_reference=CPU_FROZEN_HELDOUT)  # fmt: skip
    t = time.time()
    w = run_stage("warmup", cfg, data, one_device(cfg.warmup, device, **dry_kw), device,
                  os.path.join(root, "q_warmup"), loader_workers=loader_workers)  # fmt: skip
    partial["warmup_1a"] = {"steps": w.steps, "wall_s": round(time.time() - t, 1)}

    t = time.time()  # the profile as shipped: frozen encoder, decoder on cached tokens
    ftc = one_device(cfg.generator, device, **dry_kw, **({"cache_views": 1} if dry else {}))
    f = run_stage("generator", cfg, data, ftc, device, os.path.join(root, "q_frozen"),
                  w.model_uri, loader_workers)  # fmt: skip
    partial["frozen"] = {"miou": evaluate(f.model, data, device), "epochs": ftc.epochs,
                         "steps": f.steps, "batch": ftc.batch_size,
                         "cache_views": ftc.cache_views, "wall_s": round(time.time() - t, 1)}  # fmt: skip
    del f
    save()

    # whole encoder: probe one epoch and two steps (an epoch start included), then as many
    # epochs as fit in finetune_s; the run is time-boxed at 1.1 x the rest as a safety net
    mcfg = replace(cfg.model, trainable_blocks=-1)
    tcfg = one_device(cfg.generator, device, cache_views=0, encoder_lr_scale=encoder_lr_scale,
                      **dry_kw)  # fmt: skip
    fcfg = replace(cfg, model=mcfg)
    steps_per_epoch = max(1, data["train"].num_rows // tcfg.batch_size)
    t = time.time()
    probe_steps = 2 if dry else steps_per_epoch + 2
    probe = run_stage("generator", fcfg, data, replace(tcfg, max_steps=probe_steps), device,
                      os.path.join(root, "q_probe"), w.model_uri, loader_workers,
                      max_seconds=None if dry else 60)  # fmt: skip
    # mean wall time per step after the first, data included (samples_per_s covers the time
    # since the previous step, so epoch starts count)
    wall = statistics.mean(tcfg.batch_size / h["samples_per_s"]
                           for h in probe.history[1:] or probe.history)  # fmt: skip
    del probe
    left = finetune_s - (time.time() - t)
    epochs = max(1, min(max_epochs, int(left / (1.1 * wall * steps_per_epoch))))
    tcfg = replace(tcfg, epochs=epochs)
    t = time.time()
    ft = run_stage("generator", fcfg, data, tcfg, device, os.path.join(root, "q_finetuned"),
                   w.model_uri, loader_workers, max_seconds=1.1 * max(left, 1.0))  # fmt: skip
    train_s = round(time.time() - t, 1)
    miou = evaluate(ft.model, data, device)
    partial["finetuned"] = {"miou": miou, "epochs": epochs, "steps": ft.steps,
                            "batch": tcfg.batch_size, "decoder_lr": tcfg.lr,
                            "encoder_lr": tcfg.lr * encoder_lr_scale,
                            "probe_step_wall_s": round(wall, 4),
                            "stopped_early": ft.stopped_early,
                            **step_stats(ft.history, 5 if not dry else 1), "train_s": train_s,
                            "wall_s": round(time.time() - t, 1)}  # fmt: skip
    frozen = partial["frozen"]["miou"]
    partial["delta"] = {k: round(miou[k] - frozen[k], 4) for k in ("all", "separated")}
    return partial


# ------------------------------------------------------------------------------------ Ray
def bench_label(root: str, size: int, use_gpu: bool, num_images: int) -> dict:
    """The Ray Data labeller end to end on a synthetic set (ViT-S/14, random weights)."""
    import ray

    from exits.checkpoints import save_model
    from exits.config import CropConfig, LabelConfig
    from exits.data.prepare import load_instances
    from exits.data.synthetic import write_demo_dataset
    from exits.label import label_instances

    data = write_demo_dataset(os.path.join(root, "label_data"), num_images=num_images,
                              image_size=128, seed=0, val_fraction=0.0)  # fmt: skip
    table, _ = load_instances(data["annotations"], data["images"], check_files=False)
    ckpt = os.path.join(root, "label_generator.pt")
    kw = {"img_size": size, "pretrained": False}
    save_model(ckpt, build_generator("vit_small_dinov2", **kw), "vit_small_dinov2", "generator", kw)
    cfg = LabelConfig(batch_size=128 if use_gpu else 4, num_actors=1, use_gpu=use_gpu,
                      gpus_per_actor=1.0 if use_gpu else 0.0, images_per_block=16)  # fmt: skip
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             num_cpus=None if use_gpu else 2)  # fmt: skip
    try:
        s = label_instances(table, data["images"], ckpt, os.path.join(root, "label_run"),
                            CropConfig(size=size), cfg)  # fmt: skip
    finally:
        ray.shutdown()
    steady = s["seconds"] - (s["first_result_s"] or 0.0)  # after the first result batch
    steady_crops = s["crops"] - s.get("first_result_rows", 0)
    return {"generator": "vit_small_dinov2", "crop_size": size, "crops": s["crops"],
            "seconds": s["seconds"], "first_result_s": s["first_result_s"],
            "steady_crops_per_s": round(steady_crops / steady, 1) if steady > 0 and steady_crops > 0 else None,
            "e2e_crops_per_s": s["crops_per_s"]}  # fmt: skip


# ---------------------------------------------------------------------------------- carry
def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def prepare_carry(wheels: list[str], coco: str = SHARED_COCO) -> dict:
    """Fill data_carry/: coco_train128, the encoder weights (fp16, gzip), the given wheels; the
    sizes against the 64 MiB one command may carry (the repo's tracked files included)."""
    import subprocess

    from exits.model.convert import default_weights_path

    if not os.path.exists(os.path.join(coco, "instances_train2017.json")):
        raise SystemExit(f"gpu_check: no coco_train128 at {coco}")
    shutil.rmtree(CARRY_COCO, ignore_errors=True)
    shutil.copytree(coco, CARRY_COCO, ignore=shutil.ignore_patterns("*.py", "README*"))
    src = default_weights_path()
    if not os.path.exists(src):
        raise SystemExit(f"gpu_check: no converted weights at {src} (scripts/setup_env.sh)")
    pack_weights(src, CARRY_WEIGHTS)
    os.makedirs(CARRY_WHEELS, exist_ok=True)
    for w in wheels:
        shutil.copy(w, CARRY_WHEELS)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    repo = sum(os.path.getsize(os.path.join(REPO, f)) for f in files if f and
               os.path.isfile(os.path.join(REPO, f)))  # fmt: skip
    sizes = {"repo_tracked": repo, "coco_train128": _size(CARRY_COCO),
             "weights": _size(CARRY_WEIGHTS), "wheels": _size(CARRY_WHEELS)}  # fmt: skip
    total = sum(sizes.values())
    out = {k: round(v / 2**20, 2) for k, v in sizes.items()}
    out.update(total_mib=round(total / 2**20, 2), limit_mib=CARRY_LIMIT_MIB,
               fits=total < CARRY_LIMIT_MIB * 2**20)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same code paths")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json or ./)")
    p.add_argument("--budget-s", type=float, default=440.0, help="start no section after this")
    p.add_argument("--model-seconds", type=float, default=15.0, help="timing per model")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak override")
    p.add_argument("--train-batch", type=int, default=64, help="train_1b crops per step (GPU)")
    p.add_argument("--train-steps", type=int, default=30, help="train_1b steps (GPU)")
    p.add_argument("--finetune-s", type=float, default=220.0, help="quality: fine-tuning time")
    p.add_argument("--encoder-lr-scale", type=float, default=0.025,
                   help="quality: encoder lr / decoder lr (1e-3 x 0.025 = 2.5e-5, about the "
                        "paper's 1.5e-6 x 16 crops)")  # fmt: skip
    p.add_argument("--max-epochs", type=int, default=100, help="quality: fine-tuning cap")
    p.add_argument("--loader-workers", type=int, default=None, help="default 8 (GPU), 0 (dry)")
    p.add_argument("--coco", default=None, help="coco_train128 folder ('' = synthetic)")
    p.add_argument("--weights", default=None, help="pack_weights file (default: data_carry/)")
    p.add_argument("--prepare-carry", action="store_true", help="fill data_carry/ here and stop")
    p.add_argument("--wheel", action="append", default=[], help="with --prepare-carry: a wheel")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.prepare_carry:
        report = prepare_carry(args.wheel)
        print(json.dumps(report))
        return report
    t_start = time.time()
    dry = args.dry_run
    if dry:  # tiny tensors on a shared CPU: a second thread only spins
        torch.set_num_threads(1)
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if not dry and device.type != "cuda":
        raise SystemExit("gpu_check: no CUDA device (use --dry-run on CPU)")
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "gpu_check.json")
    workers = args.loader_workers if args.loader_workers is not None else (0 if dry else 8)
    result: dict = {"dry_run": dry, "device": str(device), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "importable": {m: importable(m) for m in ("ray", "pycocotools", "mmcv", "mmdet",
                                                               "mmengine")},
                    "args": vars(args), "sections": {}}  # fmt: skip
    sections = result["sections"]

    def save() -> None:  # after every section: a timeout keeps what ran
        result["wall_s"] = round(time.time() - t_start, 1)
        with open(out_path, "w") as f:
            json.dump(strict_json(result), f, indent=1)

    def run(name: str, fn, needs: tuple[str, ...] = (), reason: str | None = None) -> None:
        why = reason or missing(*needs)
        if why is None and time.time() - t_start > args.budget_s:
            why = "time budget spent"
        if why is not None:
            sections[name] = {"skipped": why}
        else:
            t = time.time()
            try:
                sections[name] = {**fn(), "section_s": round(time.time() - t, 1)}
            except Exception as e:  # record and go on: one JSON with whatever was measured
                sections[name] = {**sections.get(name, {}), "error": f"{type(e).__name__}: {e}",
                                  "section_s": round(time.time() - t, 1)}  # fmt: skip
        print(f"[gpu_check] {name}: {json.dumps(strict_json(sections[name]))}", flush=True)
        save()

    peak = peak_tflops(device, args.peak_tflops)
    secs = 0.5 if dry else args.model_seconds
    models = DRY_MODELS if dry else MODELS
    run("model", lambda: {k: bench_model(g, s, b, secs, device, peak)
                          for k, (g, s, b) in models.items()})  # fmt: skip

    root = tempfile.mkdtemp(prefix="exits-gpu-check-")
    coco = find_coco(args.coco)
    data: dict = {}

    def get_data() -> dict:
        if not data:
            data.update(make_data(coco, root, dry))
        return data

    batch, steps = (2, 3) if dry else (args.train_batch, args.train_steps)
    run("train_1b", lambda: bench_train_1b(get_data(), root, device, dry, batch, steps, workers),
        needs=("pycocotools",))  # fmt: skip

    weights, why = args.weights or CARRY_WEIGHTS, None
    if dry:
        weights = os.path.join(root, "encoder_random.fp16.pt.gz")
        pack_weights(random_encoder(root, DRY_CROP), weights)
    elif coco is None:
        why = "coco_train128 absent: python bench/gpu_check.py --prepare-carry (bench/README.md)"
    elif not os.path.exists(weights):
        why = f"pretrained weights {weights} absent: python bench/gpu_check.py --prepare-carry"
    left = args.budget_s - (time.time() - t_start)
    finetune_s = min(args.finetune_s, left - 100)  # the rest: 1a, the frozen run, two evals
    if why is None and not dry and finetune_s < 30:
        why = f"time budget: {left:.0f} s left"
    sections["quality"] = {}

    def quality() -> dict:
        enc = unpack_weights(weights, os.path.join(root, "encoder_pretrained.pt"))
        return bench_quality(get_data(), root, device, dry, enc, finetune_s,
                             args.encoder_lr_scale, args.max_epochs, workers,
                             sections["quality"], save)  # fmt: skip

    run("quality", quality, needs=("pycocotools",), reason=why)

    for name in RAY_SECTIONS:
        run(name, lambda: bench_label(root, DRY_CROP if dry else 224, not dry, 4 if dry else 400),
            needs=("ray", "ray.data", "pycocotools"))  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)
    save()
    print(json.dumps(strict_json(result)))
    return strict_json(result)


if __name__ == "__main__":
    main()
