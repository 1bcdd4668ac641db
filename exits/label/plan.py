"""Stage 1c planning (driver; metadata only): the input columns, the output schemas, shard
assignment (images sorted by id, ``shard_images`` per shard), image rows and the run
fingerprint. See :mod:`exits.label` for the whole stage."""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits import storage

STAGE = "label"
PREPARE_ERRORS = "prepare.parquet"
PLAN = "plan.json"
PSEUDO_JSON = "pseudo_coco.json"  # the COCO json export: <run>/label/pseudo_coco.json

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
        ("score", pa.float64()),  # quality score in [0, 1] (exits.inference.mask_score)
        ("segmentation", pa.string()),  # COCO RLE json {"size": [h, w], "counts": str}
        ("area", pa.float64()),  # mask area in pixels
        ("generator", pa.string()),  # checkpoint content id (exits.checkpoints)
        ("supervision", pa.string()),  # "extreme_points" | "box" (box-only input, bbox crop)
    ]
)
# what paste_masks emits: a mask row, or an error row when ``reason`` is set
RESULT_SCHEMA = pa.schema([("shard", pa.int32()), *MASK_SCHEMA, ("reason", pa.string())])


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
    ids, counts = np.unique(table["ann_id"].to_numpy(), return_counts=True)
    if (counts > 1).any():
        dup = ids[counts > 1]
        raise ValueError(
            f"instance table has {len(dup)} duplicate ann_id values, e.g. {dup[:5].tolist()}"
        )
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


def expected_ids(table: pa.Table) -> dict[int, np.ndarray]:
    """Shard -> the sorted int64 ann_ids it must hold, for a table with a ``shard`` column."""
    if table.num_rows == 0:
        return {}
    shards, ids = table["shard"].to_numpy(), table["ann_id"].to_numpy()
    order = np.lexsort((ids, shards))
    shards, ids = shards[order], ids[order]
    bounds = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1], True])
    return {int(shards[b]): ids[b:e] for b, e in zip(bounds[:-1], bounds[1:])}


def image_rows(table: pa.Table, max_instances: int = 0) -> pa.Table:
    """Group a sharded instance table (sorted by image) into one row per image.

    Per-image columns: shard, image_id, file_name, height, width. Per-instance list columns:
    ann_id, category_id, bbox (xywh), extreme_points ((4, 2) or null), supervision.
    ``max_instances`` > 0: an image with more instances takes several rows of at most that many
    (each decodes the image again), so one image holding thousands of annotations streams
    through the pipeline in pieces: results (and progress) keep coming, memory stays bounded.
    """
    if table.num_rows == 0:
        return pa.table({})
    image_ids = table["image_id"].to_numpy()
    new_image = np.r_[True, image_ids[1:] != image_ids[:-1]]
    if max_instances > 0:
        index = np.arange(len(image_ids))
        first = np.maximum.accumulate(np.where(new_image, index, 0))  # first row of its image
        new_image |= (index - first) % max_instances == 0
    starts = np.flatnonzero(new_image)
    offsets = pa.array(np.r_[starts, table.num_rows].astype(np.int32))
    cols: dict[str, pa.Array] = {
        name: table[name].combine_chunks().take(pa.array(starts))
        for name in ("shard", "image_id", "file_name", "height", "width")
    }
    for name in ("ann_id", "category_id", "bbox", "extreme_points", "supervision"):
        cols[name] = pa.ListArray.from_arrays(offsets, table[name].combine_chunks())
    return pa.table(cols)


def fingerprint(table: pa.Table, **settings: Any) -> str:
    """Hash of the input rows' content (every INPUT_COLUMNS value: ids, file names, sizes,
    boxes, extreme points, categories) and the settings: a changed input is never reused."""
    h = hashlib.sha256()
    content = table.select([c for c in INPUT_COLUMNS if c in table.column_names])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, content.schema) as writer:
        writer.write_table(content.combine_chunks())
    h.update(sink.getvalue().to_pybytes())
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
