"""Stage 1c Ray Data stages: decode + crop (CPU tasks), the generator (actor pool), paste back
+ RLE (CPU tasks), and ``build_dataset`` that chains them lazily (see :mod:`exits.label`)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from exits.config import CropConfig, DataConfig, LabelConfig
from exits.data import rle
from exits.data.crops import crop_and_resize, enlarge_box, instance_box
from exits.data.images import ImageError, load_image_under
from exits.inference import mask_from_logits, predict_logits
from exits.label.plan import RESULT_SCHEMA
from exits.model.generator import OUTPUT_STRIDE  # generator logits are S/4 x S/4

log = logging.getLogger(__name__)

DECODE_MEMORY_FACTOR = 4  # decoded image + warp buffers, in units of the decoded RGB image


# --------------------------------------------------------------------------------------
# Stage 1: decode + crop (CPU tasks)
# --------------------------------------------------------------------------------------
def crop_images(
    batch: pa.Table, *, images: str, size: int, enlarge: float, max_image_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Decode each image of ``batch`` (image rows) once and cut all of its instance crops.

    Returns one row per instance: shard, ann_id, image_id, category_id, height, width,
    bbox (N, 4) xywh, box / crop_box (N, 4) [x0, y0, x1, y1] edge coords, points (N, 4, 2)
    extreme points (x, y) in image pixels (NaN for box-only and error rows: the score's
    clicks), supervision, reason ("" or why the instance is an error row) and crop
    (N, S, S, 3) uint8 RGB (zeros for error rows).
    """
    out: dict[str, list] = {k: [] for k in (
        "shard", "ann_id", "image_id", "category_id", "height", "width", "bbox", "box",
        "crop_box", "points", "supervision", "reason", "crop")}  # fmt: skip
    blank = np.zeros((size, size, 3), np.uint8)
    nan4 = np.full(4, np.nan)
    nan42 = np.full((4, 2), np.nan)
    for img in batch.to_pylist():
        h, w = int(img["height"]), int(img["width"])
        image_reason = None
        try:
            pixels = load_image_under(images, img["file_name"], expected=(h, w),
                                      max_bytes=max_image_bytes or DataConfig.max_image_bytes)  # fmt: skip
            if pixels.shape[:2] != (h, w):
                image_reason = f"image size {pixels.shape[1]}x{pixels.shape[0]} differs from annotation {w}x{h}"
        except ImageError as e:
            image_reason = e.reason
        for k, ann_id in enumerate(img["ann_id"]):
            points = img["extreme_points"][k]
            bbox = img["bbox"][k]
            box, supervision, reason = instance_box(points, bbox, h, w)
            reason = image_reason or reason
            crop_box = enlarge_box(box, enlarge) if reason is None else nan4
            crop = crop_and_resize(pixels, crop_box, size)[0] if reason is None else blank
            out["shard"].append(img["shard"])
            out["ann_id"].append(ann_id)
            out["image_id"].append(img["image_id"])
            out["category_id"].append(img["category_id"][k])
            out["height"].append(h)
            out["width"].append(w)
            out["bbox"].append(bbox if bbox is not None else nan4)
            out["box"].append(box if box is not None else nan4)
            out["crop_box"].append(crop_box)
            use_points = reason is None and supervision == "extreme_points"
            out["points"].append(np.asarray(points, np.float64) if use_points else nan42)
            out["supervision"].append(supervision)
            out["reason"].append(reason or "")
            out["crop"].append(crop)
    n = len(out["ann_id"])
    return {
        "shard": np.asarray(out["shard"], np.int32),
        "ann_id": np.asarray(out["ann_id"], np.int64),
        "image_id": np.asarray(out["image_id"], np.int64),
        "category_id": np.asarray(out["category_id"], np.int64),
        "height": np.asarray(out["height"], np.int32),
        "width": np.asarray(out["width"], np.int32),
        "bbox": np.asarray(out["bbox"], np.float64).reshape(n, 4),
        "box": np.asarray(out["box"], np.float64).reshape(n, 4),
        "crop_box": np.asarray(out["crop_box"], np.float64).reshape(n, 4),
        "points": np.asarray(out["points"], np.float64).reshape(n, 4, 2),
        "supervision": np.asarray(out["supervision"], dtype=object),
        "reason": np.asarray(out["reason"], dtype=str).astype(object),
        "crop": np.stack(out["crop"]) if n else np.zeros((0, size, size, 3), np.uint8),
    }


# --------------------------------------------------------------------------------------
# Stage 2: generator (actor pool)
# --------------------------------------------------------------------------------------
class MaskPredictor:
    """The generator on one device: (B, S, S, 3) uint8 crops -> (B, S/4, S/4) float32 logits.

    Args:
        checkpoint: URI of a self-describing generator checkpoint (exits.checkpoints).
        crop_size: S; must equal the generator's input size.
        device: "cpu" or "cuda[:i]"; on CUDA the forward runs under bf16 autocast.
    """

    def __init__(self, checkpoint: str, *, crop_size: int, device: str = "cpu") -> None:
        from exits.checkpoints import load_model

        self.device = torch.device(device)
        self.model, info = load_model(checkpoint, self.device)
        if info.get("kind") != "generator":
            raise ValueError(f"{checkpoint} is a {info.get('kind')!r} checkpoint, not a generator")
        img_size = getattr(self.model, "img_size", crop_size)
        if img_size != crop_size:
            raise ValueError(f"generator input size {img_size} != crop size {crop_size}")
        self.generator_id: str = info["id"]
        self.crop_size = crop_size

    def predict_torch(self, crops: torch.Tensor) -> torch.Tensor:
        """crops (B, S, S, 3) uint8 on any device -> logits (B, S/4, S/4) float32 on device."""
        return predict_logits(self.model, crops, self.device)

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """numpy convenience: (B, S, S, 3) uint8 -> (B, S/4, S/4) float32 logits."""
        return self.predict_torch(torch.from_numpy(np.ascontiguousarray(crops))).cpu().numpy()


def reserved_threads() -> int:
    """ceil(CPUs Ray assigned to this actor/task), at least 1 (1 outside Ray)."""
    import math

    import ray

    if not ray.is_initialized():
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(cpus - 1e-9))


class GeneratorStage:
    """Ray Data actor stage: loads the generator once, maps crop rows to logit rows.

    Drops the ``crop`` column, adds ``logits`` (N, S/4, S/4) float32 (zeros for error rows)
    and ``generator`` (checkpoint id).
    """

    def __init__(
        self,
        checkpoint: str,
        *,
        crop_size: int,
        expected_id: str | None = None,
        use_gpu: bool = False,
        num_threads: int | None = None,
    ) -> None:
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("LabelConfig.use_gpu is set but this actor sees no CUDA device")
        if not use_gpu:  # torch/OpenMP threads = the CPUs this actor reserved
            torch.set_num_threads(num_threads or reserved_threads())
        self.predictor = MaskPredictor(
            checkpoint, crop_size=crop_size, device="cuda" if use_gpu else "cpu"
        )
        if expected_id is not None and self.predictor.generator_id != expected_id:
            raise RuntimeError(
                f"checkpoint {checkpoint} changed during the run "
                f"({self.predictor.generator_id} != {expected_id})"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        crops = batch.pop("crop")  # (N, S, S, 3) uint8
        n, side = len(crops), self.predictor.crop_size // OUTPUT_STRIDE
        ok = np.array([not r for r in batch["reason"]], dtype=bool)
        logits = np.zeros((n, side, side), np.float32)
        if ok.any():
            logits[ok] = self.predictor.predict(crops[ok])
        batch["logits"] = logits
        batch["generator"] = np.full(n, self.predictor.generator_id, dtype=object)
        return batch


# --------------------------------------------------------------------------------------
# Stage 3: paste back + RLE (CPU tasks)
# --------------------------------------------------------------------------------------
def paste_masks(batch: dict[str, np.ndarray], *, threshold: float) -> pa.Table:
    """Logit rows -> RESULT_SCHEMA rows (mask rows, or error rows carrying ``reason``)."""
    rows = []
    for i in range(len(batch["ann_id"])):
        reason = str(batch["reason"][i]) or None
        row = {
            "shard": int(batch["shard"][i]),
            "ann_id": int(batch["ann_id"][i]),
            "image_id": int(batch["image_id"][i]),
            "category_id": int(batch["category_id"][i]),
            "bbox": None,
            "score": None,
            "segmentation": None,
            "area": None,
            "generator": str(batch["generator"][i]),
            "supervision": str(batch["supervision"][i]),
            "reason": reason,
        }
        if reason is None:
            h, w = int(batch["height"][i]), int(batch["width"][i])
            points = batch["points"][i]  # (4, 2); NaN for box-only supervision
            mask, score = mask_from_logits(
                batch["logits"][i], batch["box"][i], batch["crop_box"][i], (h, w), threshold,
                points=points if np.isfinite(points).all() else None,
            )  # fmt: skip
            segm = rle.encode(mask)
            row.update(
                bbox=[float(v) for v in batch["bbox"][i]],
                score=score,
                segmentation=rle.to_json(segm),
                area=float(rle.area(segm)),
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def crop_task_memory(rows: pa.Table, size: int, images_per_block: int) -> int:
    """Bytes one crop task needs: its largest images decoded plus their S x S crops."""
    pixels = np.asarray(rows["height"].to_numpy(), np.int64) * rows["width"].to_numpy()
    per_image = int(pixels.max()) * 3 * DECODE_MEMORY_FACTOR
    crops = int(max(len(a) for a in rows["ann_id"].to_pylist())) * size * size * 3
    return images_per_block * (per_image + crops)


def fit_task_cpus(cfg: LabelConfig, cluster_cpus: float) -> float:
    """CPUs per decode/paste task so that one task of each CPU stage fits beside the actor pool.

    Ray Data reserves each operator's minimum (one task; the whole pool) in pipeline order
    and gives an operator whose minimum no longer fits no CPU budget while an upstream stage
    is still running. With decode + pool + paste above the cluster's CPUs (2 cores, 1 actor x
    1 CPU, 1-CPU tasks) paste then waits for decode, and every result reaches the driver at
    the end of the run instead of streaming. Returns ``min(cfg.cpus_per_task, (cluster_cpus -
    pool CPUs) / 2)``; never raises the request; ``cfg.cpus_per_task`` unchanged when the
    tasks are pinned to a decode node type (``decode_resource``: an autoscaling cluster's
    current CPUs say nothing of the nodes to come) or when the pool leaves no CPU.
    """
    left = cluster_cpus - cfg.num_actors * cfg.cpus_per_actor
    if cfg.decode_resource or left <= 0:
        return cfg.cpus_per_task
    return min(cfg.cpus_per_task, left / 2)


def fit_memory_request(request: int) -> int:
    """``request`` capped at half the largest live node's memory: a request above every node's
    capacity never schedules (Ray: "may hang forever"), and declared sizes are only checked
    against the files inside the task (a wrong declared size is an error row there)."""
    import ray

    largest = max(
        (n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0
    )
    return min(request, int(largest // 2)) if largest > 0 else request


def build_dataset(
    rows: pa.Table | list,
    *,
    images: str,
    checkpoint: str,
    generator_id: str | None,
    crop: CropConfig,
    cfg: LabelConfig,
    max_image_bytes: int | None = None,
    task_memory: int | None = None,
):
    """The lazy Ray Data pipeline over image rows (see the module docstring): ``rows`` is a
    table of image rows (cut into ``cfg.images_per_block`` blocks here) or a list of object
    references to such blocks (the driver's :func:`exits.label.plan.image_blocks`, put one at a
    time), then ``task_memory`` is the decode task's memory request (None: computed from the
    table). Image files larger than ``max_image_bytes`` (None: ``DataConfig``'s default) are
    error rows; the decode/paste tasks' CPUs come from :func:`fit_task_cpus`."""
    import ray
    import ray.data

    step = max(1, cfg.images_per_block)
    # CPU stages pinned to the decode node type when the profile names its resource
    pin = {"resources": {cfg.decode_resource: 0.001}} if cfg.decode_resource else {}
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    task_cpus = fit_task_cpus(cfg, cluster_cpus)
    if task_cpus != cfg.cpus_per_task:
        log.info("label: decode/paste tasks at %.3g CPU each (label.cpus_per_task %.3g and "
                 "the pool's %.3g do not fit %.3g CPUs)", task_cpus, cfg.cpus_per_task,
                 cfg.num_actors * cfg.cpus_per_actor, cluster_cpus)  # fmt: skip
    if isinstance(rows, pa.Table):
        task_memory = crop_task_memory(rows, crop.size, cfg.images_per_block)
        ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)])
    else:
        if task_memory is None:
            raise ValueError("build_dataset: block references need task_memory")
        ds = ray.data.from_arrow_refs(rows)
    ds = ds.map_batches(
        crop_images,
        batch_size=cfg.images_per_block,
        batch_format="pyarrow",
        fn_kwargs={
            "images": images,
            "size": crop.size,
            "enlarge": crop.inference_enlarge,
            "max_image_bytes": max_image_bytes,
        },
        # A memory request sized from the metadata. It also keeps this CPU stage out of the
        # actor stage: Ray Data fuses a task map into the following actor map when their
        # remote args match, and the (GPU) actor would then decode JPEGs itself.
        memory=fit_memory_request(task_memory),
        num_cpus=task_cpus,
        **pin,
    )
    ds = ds.map_batches(
        GeneratorStage,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "crop_size": crop.size,
            "expected_id": generator_id,
            "use_gpu": cfg.use_gpu and not cfg.logical_gpus,  # logical GPUs: torch on CPU
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=cfg.gpus_per_actor if cfg.use_gpu else 0,
        num_cpus=cfg.cpus_per_actor,
        zero_copy_batch=True,
    )
    return ds.map_batches(
        paste_masks,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        fn_kwargs={"threshold": cfg.threshold},
        num_cpus=task_cpus,
        **pin,
    )
