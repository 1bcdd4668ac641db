"""Stage 1c: bulk pseudo-labelling on Ray Data, exactly once per instance, resumable.

Pipeline (streaming; the driver never holds images, crops or logits)::

    image rows (one per image, its instances as list columns; small metadata blocks)
      -> crop_images   CPU tasks: decode each image once, cut every instance crop at the fixed
                       1.3x enlargement of its box, resize to S x S      (images_per_block images)
      -> GeneratorStage actor pool (ActorPoolStrategy(size=num_actors), num_gpus=gpus_per_actor):
                       generator loaded once per actor, crops (B, 3, S, S) -> logits
                       (B, S/4, S/4), bf16 autocast on CUDA                (batch_size crops)
      -> paste_masks   CPU tasks: sigmoid, zero outside the box, paste back at full resolution,
                       threshold, COCO RLE (pycocotools)
      -> driver        commits finished output shards (below)

Bad input never crashes the job: a missing/corrupt image, an image whose decoded size differs
from the annotation's, degenerate extreme points or a degenerate box become error rows
``(ann_id, image_id, stage="label", reason)`` that flow through the pipeline beside the crops.

Exactly once + resume: **deterministic output shards** (chosen over Ray Data's id-column
checkpointing, which in ray 2.60 is alpha, needs a read -> map-only -> write pipeline whose id
column survives every stage, and cannot follow our image -> instance row fan-out). Images are
sorted by ``image_id`` and cut into shards of ``shard_images`` images; the plan (shard count
plus a fingerprint of the inputs, generator and settings) is written to ``plan.json`` on the
first run and a re-run against a different plan fails loudly. The driver consumes the result
stream, keys rows by ``ann_id`` (so a retried Ray task cannot duplicate a row) and, as soon as a
shard holds every one of its instances, publishes ``errors/shard-00012.parquet`` and then
``masks/shard-00012.parquet`` (each an atomic single-object write; the masks file is the commit
marker). A re-run lists the committed shards and feeds only the other images into the pipeline.
:func:`verify_outputs` then checks that every input ``ann_id`` appears exactly once in masks
plus errors, and ``manifest.json`` is written last.

Output layout under ``<output>/label/``::

    plan.json, masks/shard-NNNNN.parquet (MASK_SCHEMA), errors/shard-NNNNN.parquet
    (coco.ERROR_SCHEMA), errors/prepare.parquet (upstream errors carried along), manifest.json
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pycocotools import mask as mask_utils

from exits import manifest, storage
from exits.config import CropConfig, LabelConfig
from exits.data.coco import ERROR_SCHEMA, error_row, read_table, rle_to_json, write_table
from exits.data.crops import crop_and_resize, enlarge_box, instance_box, paste_mask
from exits.data.images import ImageError, load_image
from exits.inference import predict_logits
from exits.model.generator import OUTPUT_STRIDE  # generator logits are S/4 x S/4

log = logging.getLogger(__name__)

STAGE = "label"
SHARD_FORMAT = "shard-{:05d}.parquet"
PREPARE_ERRORS = "prepare.parquet"
PLAN = "plan.json"
DECODE_MEMORY_FACTOR = 4  # decoded image + warp buffers, in units of the decoded RGB image

# columns of the instance table the pipeline needs (gt_segmentation etc. stay behind)
INPUT_COLUMNS = (
    "image_id",
    "ann_id",
    "category_id",
    "file_name",
    "height",
    "width",
    "bbox",
    "extreme_points",
    "supervision",
)
MASK_SCHEMA = pa.schema(
    [
        ("ann_id", pa.int64()),
        ("image_id", pa.int64()),
        ("category_id", pa.int64()),
        ("bbox", pa.list_(pa.float64(), 4)),  # COCO xywh of the box the mask is confined to
        ("score", pa.float64()),  # mean probability inside the mask (0 for an empty mask)
        ("segmentation", pa.string()),  # COCO RLE json {"size": [h, w], "counts": str}
        ("area", pa.float64()),  # mask area in pixels
        ("generator", pa.string()),  # checkpoint content id (exits.checkpoints)
        ("supervision", pa.string()),  # "extreme_points" | "box" (box-only input, bbox crop)
    ]
)
# what paste_masks emits: a mask row, or an error row when ``reason`` is set
RESULT_SCHEMA = pa.schema([("shard", pa.int32()), *MASK_SCHEMA, ("reason", pa.string())])


class InjectedFault(RuntimeError):
    """``LabelConfig.fail_after_batches = K > 0``: the driver stops the run after consuming K
    result batches (shards completed by then are committed), like a job killed part way."""


class OutputMismatch(RuntimeError):
    """The label outputs do not hold every input instance exactly once."""


# --------------------------------------------------------------------------------------
# Planning (driver; metadata only)
# --------------------------------------------------------------------------------------
def read_instances(instances: pa.Table | str) -> pa.Table:
    """The pipeline's input columns of an instance table (Arrow table or Parquet URI)."""
    if isinstance(instances, str):
        fs, path = storage.get_filesystem(instances)
        table = pq.read_table(path, filesystem=fs, columns=list(INPUT_COLUMNS))
    else:
        missing = set(INPUT_COLUMNS) - set(instances.column_names)
        if missing:
            raise ValueError(f"instance table lacks columns {sorted(missing)}")
        table = instances.select(list(INPUT_COLUMNS))
    ids = table["ann_id"].to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise ValueError("instance table has duplicate ann_id values")
    return table


def assign_shards(table: pa.Table, shard_images: int) -> pa.Table:
    """Add an int32 ``shard`` column: images sorted by id, ``shard_images`` per shard.

    Deterministic for a given set of image ids; rows come back sorted by (image_id, ann_id).
    """
    if shard_images < 1:
        raise ValueError(f"shard_images must be >= 1, got {shard_images}")
    table = table.sort_by([("image_id", "ascending"), ("ann_id", "ascending")])
    image_ids = table["image_id"].to_numpy()
    _, rank = np.unique(image_ids, return_inverse=True)
    return table.append_column("shard", pa.array((rank // shard_images).astype(np.int32)))


def image_rows(table: pa.Table) -> pa.Table:
    """Group a sharded instance table (sorted by image) into one row per image.

    Per-image columns: shard, image_id, file_name, height, width. Per-instance list columns:
    ann_id, category_id, bbox (xywh), extreme_points ((4, 2) or null), supervision.
    """
    if table.num_rows == 0:
        return pa.table({})
    image_ids = table["image_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]])
    offsets = pa.array(np.r_[starts, table.num_rows].astype(np.int32))
    cols: dict[str, pa.Array] = {
        name: table[name].combine_chunks().take(pa.array(starts))
        for name in ("shard", "image_id", "file_name", "height", "width")
    }
    for name in ("ann_id", "category_id", "bbox", "extreme_points", "supervision"):
        cols[name] = pa.ListArray.from_arrays(offsets, table[name].combine_chunks())
    return pa.table(cols)


def _fingerprint(table: pa.Table, **settings: Any) -> str:
    h = hashlib.sha256()
    for name in ("ann_id", "image_id"):
        h.update(np.ascontiguousarray(table[name].to_numpy(), dtype=np.int64).tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def describe_checkpoint(uri: str) -> dict[str, Any]:
    """{"id", "kind", "builder", "input_size"} of a checkpoint without building the model.

    ``id`` is the content hash ``exits.checkpoints.load_model`` reports; ``input_size`` is the
    builder's ``img_size`` (from the checkpoint's builder kwargs, else the builder default).
    """
    from exits.checkpoints import read_checkpoint
    from exits.model.generator import GENERATORS

    obj = read_checkpoint(uri)
    builder = obj["builder"]
    if builder not in GENERATORS:
        raise ValueError(f"{uri}: unknown builder {builder!r}; have {sorted(GENERATORS)}")
    size = (obj.get("builder_kwargs") or {}).get("img_size")
    if size is None:
        size = inspect.signature(GENERATORS[builder]).parameters["img_size"].default
    return {"id": obj["id"], "kind": obj.get("kind"),
            "builder": builder, "input_size": int(size)}  # fmt: skip


def shard_uri(output: str, kind: str, shard: int) -> str:
    return manifest.stage_uri(output, STAGE, kind, SHARD_FORMAT.format(shard))


def committed_shards(output: str) -> set[int]:
    """Shards whose masks file (the commit marker) exists."""
    done = set()
    for uri in storage.list_dir(manifest.stage_uri(output, STAGE, "masks")):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet"):
            done.add(int(name[len("shard-") : -len(".parquet")]))
    return done


# --------------------------------------------------------------------------------------
# Stage 1: decode + crop (CPU tasks)
# --------------------------------------------------------------------------------------
def crop_images(
    batch: pa.Table, *, images: str, size: int, enlarge: float
) -> dict[str, np.ndarray]:
    """Decode each image of ``batch`` (image rows) once and cut all of its instance crops.

    Returns one row per instance: shard, ann_id, image_id, category_id, height, width,
    bbox (N, 4) xywh, box / crop_box (N, 4) [x0, y0, x1, y1] edge coords, supervision,
    reason ("" or why the instance is an error row) and crop (N, S, S, 3) uint8 RGB
    (zeros for error rows).
    """
    out: dict[str, list] = {k: [] for k in (
        "shard", "ann_id", "image_id", "category_id", "height", "width", "bbox", "box",
        "crop_box", "supervision", "reason", "crop")}  # fmt: skip
    blank = np.zeros((size, size, 3), np.uint8)
    nan4 = np.full(4, np.nan)
    for img in batch.to_pylist():
        h, w = int(img["height"]), int(img["width"])
        image_reason = None
        try:
            pixels = load_image(storage.join(images, img["file_name"]))
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
        num_threads: int = 1,
    ) -> None:
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("LabelConfig.use_gpu is set but this actor sees no CUDA device")
        if not use_gpu:
            torch.set_num_threads(max(1, num_threads))
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
def mask_from_logits(
    logits: np.ndarray,
    box: np.ndarray,
    crop_box: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float,
) -> tuple[np.ndarray, float]:
    """(h, w) crop-space logits -> (H, W) bool mask confined to ``box`` and its score.

    Sigmoid, bilinear paste through the inverse crop map (zero outside the box), threshold.
    The score is the mean probability inside the mask (0 for an empty mask).
    """
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))  # (h, w)
    full = paste_mask(prob, crop_box, image_hw, box=box)  # (H, W) float32, 0 outside the box
    mask = full >= threshold
    score = float(full[mask].mean()) if mask.any() else 0.0
    return mask, score


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
            mask, score = mask_from_logits(
                batch["logits"][i], batch["box"][i], batch["crop_box"][i], (h, w), threshold
            )
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            row.update(
                bbox=[float(v) for v in batch["bbox"][i]],
                score=score,
                segmentation=rle_to_json(rle),
                area=float(mask_utils.area(rle)),
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


# --------------------------------------------------------------------------------------
# Driver: commit shards exactly once
# --------------------------------------------------------------------------------------
class ShardCommitter:
    """Buffers result rows per shard (keyed by ann_id) and publishes each shard once complete.

    Args:
        output: run directory URI.
        expected: shard -> the ann_ids it must hold.
    """

    def __init__(self, output: str, expected: dict[int, set[int]]) -> None:
        self.output = output
        self.expected = expected
        self.buffers: dict[int, dict[int, dict]] = {}
        self.committed: list[int] = []
        self.counts = {"masks": 0, "errors": 0, "empty_masks": 0, "crops": 0}

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            shard, ann_id = row.pop("shard"), row["ann_id"]
            if ann_id not in self.expected.get(shard, ()):
                raise OutputMismatch(
                    f"pipeline returned ann_id {ann_id} not planned for shard {shard}"
                )
            # keyed by ann_id: a retried task overwrites its rows, never duplicates them
            self.buffers.setdefault(shard, {})[ann_id] = row
            if len(self.buffers[shard]) == len(self.expected[shard]):
                self._commit(shard)

    def _commit(self, shard: int) -> None:
        buffered = self.buffers.pop(shard)
        rows = [buffered[a] for a in sorted(self.expected[shard])]
        errors = [
            error_row(r["ann_id"], r["image_id"], STAGE, r["reason"]) for r in rows if r["reason"]
        ]
        masks = [{k: r[k] for k in MASK_SCHEMA.names} for r in rows if not r["reason"]]
        write_table(
            pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
            shard_uri(self.output, "errors", shard),
        )
        write_table(
            pa.Table.from_pylist(masks, schema=MASK_SCHEMA), shard_uri(self.output, "masks", shard)
        )
        self.committed.append(shard)
        self.counts["masks"] += len(masks)
        self.counts["errors"] += len(errors)
        self.counts["crops"] += len(masks)
        self.counts["empty_masks"] += sum(1 for m in masks if m["area"] == 0)

    def check_complete(self) -> None:
        missing = sorted(set(self.expected) - set(self.committed))
        if missing:
            lost = {
                s: sorted(self.expected[s] - set(self.buffers.get(s, {})))[:5] for s in missing[:5]
            }
            raise OutputMismatch(
                f"{len(missing)} shards incomplete after the pipeline ended; e.g. missing {lost}"
            )


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def crop_task_memory(rows: pa.Table, size: int, images_per_block: int) -> int:
    """Bytes one crop task needs: its largest images decoded plus their S x S crops."""
    pixels = np.asarray(rows["height"].to_numpy(), np.int64) * rows["width"].to_numpy()
    per_image = int(pixels.max()) * 3 * DECODE_MEMORY_FACTOR
    crops = int(max(len(a) for a in rows["ann_id"].to_pylist())) * size * size * 3
    return images_per_block * (per_image + crops)


def build_dataset(
    rows: pa.Table,
    *,
    images: str,
    checkpoint: str,
    generator_id: str | None,
    crop: CropConfig,
    cfg: LabelConfig,
):
    """The lazy Ray Data pipeline over image rows (see the module docstring)."""
    import ray.data

    n = rows.num_rows
    step = max(1, cfg.images_per_block)
    blocks = [rows.slice(i, step) for i in range(0, n, step)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        crop_images,
        batch_size=cfg.images_per_block,
        batch_format="pyarrow",
        fn_kwargs={"images": images, "size": crop.size, "enlarge": crop.inference_enlarge},
        # A memory request sized from the metadata. It also keeps this CPU stage out of the
        # actor stage: Ray Data fuses a task map into the following actor map when their
        # remote args match, and the (GPU) actor would then decode JPEGs itself.
        memory=crop_task_memory(rows, crop.size, cfg.images_per_block),
    )
    ds = ds.map_batches(
        GeneratorStage,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "crop_size": crop.size,
            "expected_id": generator_id,
            "use_gpu": cfg.use_gpu,
            "num_threads": int(max(1, round(cfg.cpus_per_actor))),
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
    )


def _validate(crop: CropConfig, cfg: LabelConfig) -> None:
    if not 0.0 < cfg.threshold < 1.0:
        raise ValueError(f"LabelConfig.threshold must be in (0, 1), got {cfg.threshold}")
    if cfg.num_actors < 1 or cfg.batch_size < 1 or cfg.images_per_block < 1:
        raise ValueError("LabelConfig num_actors, batch_size, images_per_block must be >= 1")
    if cfg.use_gpu and cfg.gpus_per_actor <= 0:
        raise ValueError("LabelConfig.use_gpu needs gpus_per_actor > 0")
    if crop.size % OUTPUT_STRIDE:
        raise ValueError(f"crop size {crop.size} is not a multiple of {OUTPUT_STRIDE}")


def label_instances(
    instances: pa.Table | str,
    images: str,
    checkpoint: str,
    output: str,
    crop: CropConfig,
    cfg: LabelConfig,
    *,
    upstream_errors: pa.Table | None = None,
    shard_images: int | None = None,
) -> dict[str, Any]:
    """Pseudo-label every instance once; resumable; returns a summary dict.

    Args:
        instances: instance table (exits.data.coco schema) or its Parquet URI.
        images: URI prefix the instances' ``file_name`` is relative to.
        checkpoint: generator checkpoint URI (exits.checkpoints format).
        output: run directory URI; results go to ``<output>/label/``.
        crop: crop size S (= the generator's input size) and inference enlargement.
        cfg: batch/pool sizes, devices, threshold, fault injection.
        upstream_errors: error rows of earlier stages (e.g. prepare), carried into
            ``errors/prepare.parquet`` so the errors output is complete.
        shard_images: images per output shard (commit/resume unit); None: ``cfg.shard_images``.

    Returns:
        {"instances", "masks", "errors", "prepare_errors", "empty_masks", "crops", "shards",
         "shards_skipped", "shards_written", "seconds", "first_result_s" (actor start-up and
         pipeline fill), "crops_per_s" (this run's crops / seconds), "generator", "output"}
    """
    _validate(crop, cfg)
    if shard_images is None:
        shard_images = cfg.shard_images
    started = time.time()
    table = assign_shards(read_instances(instances), shard_images)
    ckpt = describe_checkpoint(checkpoint)
    if ckpt["kind"] != "generator":
        raise ValueError(f"{checkpoint} is a {ckpt['kind']!r} checkpoint, not a generator")
    if ckpt["input_size"] != crop.size:
        raise ValueError(f"crop size {crop.size} != generator input size {ckpt['input_size']}")
    gen_id = ckpt["id"]
    fp = _fingerprint(
        table, generator=gen_id, images=images, size=crop.size, enlarge=crop.inference_enlarge,
        threshold=cfg.threshold, shard_images=shard_images,
    )  # fmt: skip
    num_shards = int(table["shard"].to_numpy().max()) + 1 if table.num_rows else 0
    stage_dir = manifest.stage_uri(output, STAGE)
    plan_uri = storage.join(stage_dir, PLAN)
    if storage.exists(plan_uri):
        plan = storage.read_json(plan_uri)
        if plan.get("fingerprint") != fp:
            raise ValueError(
                f"{stage_dir} holds a labelling run with other inputs/settings "
                f"(plan {plan.get('fingerprint')} != {fp}); use a new output or delete it"
            )
    else:
        storage.write_json(plan_uri, {"fingerprint": fp, "num_shards": num_shards,
                                      "shard_images": shard_images, "instances": table.num_rows})  # fmt: skip
    if upstream_errors is not None:
        write_table(
            upstream_errors.cast(ERROR_SCHEMA), storage.join(stage_dir, "errors", PREPARE_ERRORS)
        )
    if manifest.is_done(output, STAGE, fp):
        log.info("label: %s already done (fingerprint %s)", stage_dir, fp)
        return {**manifest.read_manifest(output, STAGE)["summary"], "cached": True}

    done = committed_shards(output)
    shards = table["shard"].to_numpy()
    todo = table.filter(pa.array(~np.isin(shards, sorted(done))))
    expected: dict[int, set[int]] = {}
    for s, a in zip(todo["shard"].to_numpy(), todo["ann_id"].to_numpy()):
        expected.setdefault(int(s), set()).add(int(a))
    committer = ShardCommitter(output, expected)
    t0, first_result = time.time(), None
    if todo.num_rows:
        ds = build_dataset(
            image_rows(todo),
            images=images,
            checkpoint=checkpoint,
            generator_id=gen_id,
            crop=crop,
            cfg=cfg,
        )
        for n, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow"), 1):
            if first_result is None:
                first_result = time.time() - t0
            committer.add(batch)
            if 0 < cfg.fail_after_batches <= n:
                raise InjectedFault(f"fault injection: stopping after {n} result batches")
    committer.check_complete()
    seconds = time.time() - t0
    counts = verify_outputs(output, table, upstream_errors)
    summary = {
        **counts,
        "empty_masks": committer.counts["empty_masks"],
        "crops": committer.counts["crops"],
        "shards": num_shards,
        "shards_skipped": len(done & set(range(num_shards))),
        "shards_written": len(committer.committed),
        "seconds": round(seconds, 3),
        "first_result_s": round(first_result, 3) if first_result is not None else None,
        "crops_per_s": round(committer.counts["crops"] / seconds, 2) if seconds > 0 else 0.0,
        "generator": gen_id,
        "output": stage_dir,
    }
    manifest.write_manifest(
        output, STAGE, fp, started,
        inputs={"instances": instances if isinstance(instances, str) else "<table>",
                "images": images, "checkpoint": checkpoint},
        config={"crop": vars(crop), "label": vars(cfg), "shard_images": shard_images},
        summary=summary,
    )  # fmt: skip
    return summary


def _read_dir(uri: str, schema: pa.Schema, skip: tuple[str, ...] = ()) -> pa.Table:
    tables = [
        read_table(f).cast(schema)
        for f in storage.list_dir(uri)
        if f.endswith(".parquet") and f.rsplit("/", 1)[-1] not in skip
    ]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_masks(output: str) -> pa.Table:
    """All committed mask rows of a run (MASK_SCHEMA)."""
    return _read_dir(manifest.stage_uri(output, STAGE, "masks"), MASK_SCHEMA)


def read_errors(output: str, include_prepare: bool = True) -> pa.Table:
    """All error rows of a run (coco.ERROR_SCHEMA); label errors plus carried prepare errors."""
    skip = () if include_prepare else (PREPARE_ERRORS,)
    return _read_dir(manifest.stage_uri(output, STAGE, "errors"), ERROR_SCHEMA, skip)


def verify_outputs(
    output: str, instances: pa.Table | str, upstream_errors: pa.Table | None = None
) -> dict[str, int]:
    """Check that every input instance is in the outputs exactly once (mask or error row).

    Raises:
        OutputMismatch: on any missing, duplicated or unexpected ann_id, listing examples.

    Returns:
        {"instances", "masks", "errors" (label stage), "prepare_errors"}.
    """
    table = read_instances(instances)
    masks = read_masks(output)
    errors = read_errors(output, include_prepare=False)
    want = table["ann_id"].to_numpy()
    got = np.concatenate([masks["ann_id"].to_numpy(), errors["ann_id"].to_numpy()])
    ids, counts = np.unique(got, return_counts=True)
    duplicated = ids[counts > 1]
    missing = np.setdiff1d(want, ids)
    unexpected = np.setdiff1d(ids, want)
    if len(duplicated) or len(missing) or len(unexpected):
        raise OutputMismatch(
            f"label outputs at {output}: {len(want)} inputs, {masks.num_rows} masks, "
            f"{errors.num_rows} errors; missing {len(missing)} (e.g. {missing[:5].tolist()}), "
            f"duplicated {len(duplicated)} (e.g. {duplicated[:5].tolist()}), "
            f"unexpected {len(unexpected)} (e.g. {unexpected[:5].tolist()})"
        )
    prepare = storage.join(manifest.stage_uri(output, STAGE, "errors"), PREPARE_ERRORS)
    n_prepare = read_table(prepare).num_rows if storage.exists(prepare) else 0
    if upstream_errors is not None and n_prepare != upstream_errors.num_rows:
        raise OutputMismatch(
            f"{prepare} holds {n_prepare} rows, expected {upstream_errors.num_rows}"
        )
    return {"instances": len(want), "masks": masks.num_rows, "errors": errors.num_rows,
            "prepare_errors": n_prepare}  # fmt: skip
