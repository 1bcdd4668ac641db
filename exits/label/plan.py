"""Stage 1c planning (driver; metadata only): the input columns, the output schemas, shard
assignment (images sorted by id, ``shard_images`` per shard), image rows and the run
fingerprint. See :mod:`exits.label` for the whole stage.

The driver never holds the instance table: :func:`scan_input` reads it part by part once and
keeps per instance only its ``ann_id`` and shard (12 bytes; 15 MB at LVIS's 1.27 M) plus a
digest of every input value; :func:`image_blocks` then turns it, part by part again, into the
pipeline's image-row blocks of the shards still to do."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits import storage
from exits.data.coco import parquet_dataset, scan_batches

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


PART_ROWS = 65_536  # instance rows per planning part (a record batch of the table)


def read_instances(instances: pa.Table | str) -> pa.Table:
    """The pipeline's input columns of an instance table (Arrow table or Parquet URI), whole
    (benches and tests; the labelling driver reads it part by part: :func:`instance_parts`)."""
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


def expected_ids(shards: np.ndarray, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Shard -> the sorted int64 ann_ids it must hold, from each instance's shard and ann_id."""
    if len(ids) == 0:
        return {}
    order = np.lexsort((ids, shards))
    shards, ids = shards[order], ids[order]
    bounds = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1], True])
    return {int(shards[b]): ids[b:e] for b, e in zip(bounds[:-1], bounds[1:])}


def instance_parts(instances: pa.Table | str) -> Iterator[pa.Table]:
    """The table's INPUT_COLUMNS one part at a time, in a fixed order: the record batches
    (<= PART_ROWS rows) of each Parquet part of a URI, part after part (prepare writes one part
    per image shard, images sorted: an image's rows are together), or PART_ROWS-row slices of an
    in-memory table sorted by (image_id, ann_id).

    Raises:
        FileNotFoundError: nothing at the URI.
        ValueError: a needed column is missing.
    """
    if isinstance(instances, str):
        data = parquet_dataset(instances)
        if data is None:
            raise FileNotFoundError(f"no instance table at {instances}")
        missing = set(INPUT_COLUMNS) - set(data.schema.names)
        if missing:
            raise ValueError(f"instance table {instances} lacks columns {sorted(missing)}")
        schema = pa.schema([data.schema.field(c) for c in INPUT_COLUMNS])
        for batch in scan_batches(data, INPUT_COLUMNS, PART_ROWS):
            yield pa.Table.from_batches([batch]).select(list(INPUT_COLUMNS)).cast(schema)
        return
    missing = set(INPUT_COLUMNS) - set(instances.column_names)
    if missing:
        raise ValueError(f"instance table lacks columns {sorted(missing)}")
    table = instances.select(list(INPUT_COLUMNS))
    table = table.sort_by([("image_id", "ascending"), ("ann_id", "ascending")])
    for start in range(0, table.num_rows, PART_ROWS):
        yield table.slice(start, PART_ROWS)


@dataclass
class InputScan:
    """What the driver keeps of the instance table (:func:`scan_input`)."""

    ann_id: np.ndarray  # int64 per instance, in instance_parts order
    shard: np.ndarray  # int32 per instance: its image's shard
    image_ids: np.ndarray  # sorted unique int64 image ids (rank // shard_images = shard)
    file_names: list[str]  # sorted unique image file names
    digest: str  # sha256 of every INPUT_COLUMNS value, part by part

    @property
    def num_shards(self) -> int:
        return int(self.shard.max()) + 1 if len(self.shard) else 0


def shard_of(image_id: np.ndarray, image_ids: np.ndarray, shard_images: int) -> np.ndarray:
    """int32 shard of each ``image_id``: its rank among the sorted unique ``image_ids``, divided
    by ``shard_images`` (the same rule as :func:`assign_shards`)."""
    return (np.searchsorted(image_ids, image_id) // shard_images).astype(np.int32)


def scan_input(instances: pa.Table | str, shard_images: int) -> InputScan:
    """One pass over the instance table, part by part: ids, shards, file names and the content
    digest of the run's fingerprint. Memory: one part plus 12 bytes per instance.

    Raises:
        ValueError: ``shard_images`` < 1, a missing column or a repeated ``ann_id``.
    """
    if shard_images < 1:
        raise ValueError(f"shard_images must be >= 1, got {shard_images}")
    h = hashlib.sha256()
    ann_ids, image_id, names = [], [], set()
    for part in instance_parts(instances):
        h.update(_ipc_bytes(part))
        ann_ids.append(part["ann_id"].to_numpy())
        image_id.append(part["image_id"].to_numpy())
        names.update(part["file_name"].unique().to_pylist())
    ann_id = np.concatenate(ann_ids) if ann_ids else np.empty(0, np.int64)
    image_id = np.concatenate(image_id) if image_id else np.empty(0, np.int64)
    ids, counts = np.unique(ann_id, return_counts=True)
    if (counts > 1).any():
        dup = ids[counts > 1]
        raise ValueError(
            f"instance table has {len(dup)} duplicate ann_id values, e.g. {dup[:5].tolist()}"
        )
    image_ids = np.unique(image_id)
    return InputScan(ann_id=ann_id, shard=shard_of(image_id, image_ids, shard_images),
                     image_ids=image_ids, file_names=sorted(n for n in names if n is not None),
                     digest=h.hexdigest())  # fmt: skip


def image_blocks(
    instances: pa.Table | str,
    image_ids: np.ndarray,
    shard_images: int,
    skip_shards: set[int],
    images_per_block: int,
    max_instances: int = 0,
) -> Iterator[pa.Table]:
    """The pipeline's input: image rows (:func:`image_rows`) of every shard not in
    ``skip_shards``, at most ``images_per_block`` rows per block, built one part at a time.
    An image whose rows straddle two parts (not so in prepare's tables) gets a row in each."""
    skip = np.asarray(sorted(skip_shards), np.int32)
    for part in instance_parts(instances):
        shard = shard_of(part["image_id"].to_numpy(), image_ids, shard_images)
        keep = ~np.isin(shard, skip)
        if not keep.any():
            continue
        part = part.append_column("shard", pa.array(shard)).filter(pa.array(keep))
        part = part.sort_by([("image_id", "ascending"), ("ann_id", "ascending")])
        rows = image_rows(part, max_instances=max_instances)
        for start in range(0, rows.num_rows, images_per_block):
            yield rows.slice(start, images_per_block)


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


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def fingerprint(digest: str, **settings: Any) -> str:
    """Hash of the input rows' content (:attr:`InputScan.digest`: every INPUT_COLUMNS value:
    ids, file names, sizes, boxes, extreme points, categories) and the settings: a changed
    input is never reused."""
    h = hashlib.sha256(digest.encode())
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
