"""Stage ``prepare`` at scale: annotation json -> columns -> image shards -> sharded instance table.

1. :func:`load_columns` streams the json once (:mod:`exits.data.jsonstream`) into Arrow columns
   (``ANNOTATION_SCHEMA``, one row per annotation in file order); no per-annotation Python
   object outlives its batch. Irregular annotations (odd types, RLE, ``extreme_points``, unknown
   keys) keep their json text in ``raw`` so the per-annotation checks see exactly what the file
   says.
2. :func:`plan_shards` decides with column operations which annotation repeats an earlier id
   (``duplicate``) and which image shard each row belongs to (images sorted by id,
   ``shard_images`` per shard, as in stage 1c).
3. :func:`prepare_shard` turns one shard into instance and error rows (header-only image
   checks, then :func:`exits.data.coco.build_instances`). :func:`prepare_instances` runs it as
   Ray Data tasks (one per shard, on the cluster's CPU nodes) and writes the instance table as a
   directory of Parquet parts ``<table>/part-NNNNN.parquet`` plus one errors file. Without Ray
   the shards run in-process; :func:`prepare_in_process` and :func:`load_instances` keep
   everything in memory (tests, benches, small sets).

Imports point down: ``prepare`` -> ``coco`` (per-annotation rows) -> ``validate`` (checks).
``python -m exits.data.prepare ANNOTATIONS IMAGES --out DIR`` writes the tables.

Every annotation ends up exactly once in the instances or the errors.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from exits import storage
from exits.config import DataConfig
from exits.data import validate
from exits.data.coco import (
    ERROR_SCHEMA,
    INSTANCE_SCHEMA,
    build_instances,
    check_images,
    file_name_error,
    read_table,
    write_table,
)
from exits.data.images import image_uri
from exits.data.jsonstream import iter_members

PART_FORMAT = "part-{:05d}.parquet"
BATCH_ROWS = 16384  # annotations converted to Arrow at a time while parsing
ANNOTATION_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),  # the id when integral (null otherwise: see raw)
        ("image_id", pa.int64()),
        ("category_id", pa.int64()),
        ("iscrowd", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
        ("area", pa.float64()),
        ("polygons", pa.list_(pa.list_(pa.float64()))),  # COCO polygon segmentation
        ("raw", pa.string()),  # json of an irregular annotation (all other columns advisory)
    ]
)
# image: json of its fields; an id declared more than once: {"_entries": [every entry]}
IMAGE_SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.string())])
_IMAGE_FIELDS = ("id", "file_name", "coco_url", "height", "width")
_INT_FIELDS = ("id", "image_id", "category_id", "iscrowd")


@dataclass
class CocoColumns:
    """A COCO-format json in columns: annotations (ANNOTATION_SCHEMA, file order), images
    (IMAGE_SCHEMA, sorted by id; a repeated id keeps every entry) and the category ids."""

    annotations: pa.Table
    images: pa.Table
    categories: list[int] = field(default_factory=list)


def _regular(a: Any) -> bool:
    """Whether an annotation fits the typed columns exactly (else it is kept as raw json)."""
    if type(a) is not dict:
        return False
    for key, v in a.items():
        if key in _INT_FIELDS:
            if type(v) is not int or not validate.INT64_MIN <= v <= validate.INT64_MAX:
                return False
        elif key == "area":
            if type(v) not in (int, float):
                return False
        elif key == "bbox":
            if type(v) is not list:
                return False
        elif key == "segmentation":
            # polygons of plain numbers only: the typed column would turn a bool into 1.0, the
            # raw path gives it an error row (validate.check_polygons)
            if type(v) is not list or any(
                type(p) is not list or not validate.plain_numbers(p) for p in v
            ):
                return False
        else:
            return False
    return True


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError)


def _typed_columns(anns: list[Any], regular: list[bool]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in ANNOTATION_SCHEMA.names}
    for a, ok in zip(anns, regular):
        d = a if isinstance(a, dict) else {}
        cols["id"].append(validate.id_or_none(d.get("id")))  # int64 or null
        cols["image_id"].append(validate.id_or_none(d.get("image_id")))
        for name, key in (("category_id", "category_id"), ("iscrowd", "iscrowd"),
                          ("bbox", "bbox"), ("area", "area"), ("polygons", "segmentation")):  # fmt: skip
            cols[name].append(d.get(key) if ok else None)
        cols["raw"].append(None if ok else json.dumps(a))
    return pa.Table.from_pydict(cols, schema=ANNOTATION_SCHEMA)


def _annotation_batch(anns: list[Any], first_seq: int) -> pa.Table:
    regular = [_regular(a) for a in anns]
    try:
        table = _typed_columns(anns, regular)
    except _ARROW_ERRORS:
        # a value that does not convert (a string coordinate, a huge int): that row goes raw
        for i, a in enumerate(anns):
            if regular[i]:
                try:
                    _typed_columns([a], [True])
                except _ARROW_ERRORS:
                    regular[i] = False
        table = _typed_columns(anns, regular)
    return table.add_column(0, "seq", pa.array(np.arange(first_seq, first_seq + len(anns))))


def load_columns(uri: str) -> CocoColumns:
    """Stream the COCO json at ``uri`` into :class:`CocoColumns` (raises ValueError if unreadable)."""
    batches, pending, images, categories = [], [], {}, []
    seq = 0
    try:
        for key, value in iter_members(uri, arrays=("annotations", "images")):
            if key == "annotations":
                pending.append(value)
                if len(pending) == BATCH_ROWS:
                    batches.append(_annotation_batch(pending, seq))
                    seq, pending = seq + len(pending), []
            elif key == "images" and isinstance(value, dict):
                image_id = validate.id_or_none(value.get("id"))
                if image_id is not None:
                    entry = {k: value[k] for k in _IMAGE_FIELDS if k in value}
                    images.setdefault(image_id, []).append(entry)
            elif key == "categories":
                if not isinstance(value, list):
                    raise ValueError(f"'categories' must be a list, got {validate.kind(value)}")
                categories = sorted(validate.check_categories(value))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read annotations {uri}: {type(e).__name__}: {e}") from None
    except ValueError as e:
        raise ValueError(f"annotations {uri}: {e}") from None
    if pending:
        batches.append(_annotation_batch(pending, seq))
    schema = pa.schema([("seq", pa.int64()), *ANNOTATION_SCHEMA])
    annotations = pa.concat_tables(batches) if batches else schema.empty_table()
    ids = np.array(sorted(images), dtype=np.int64)
    image_table = pa.table(
        {"id": ids, "image": pa.array([_image_json(images[i]) for i in ids.tolist()], pa.string())},
        schema=IMAGE_SCHEMA,
    )
    return CocoColumns(annotations, image_table, categories)


def _image_json(entries: list[dict]) -> str:
    return json.dumps(entries[0] if len(entries) == 1 else {"_entries": entries})


def annotation_dicts(table: pa.Table) -> list[Any]:
    """Annotation dicts (as in the json) of a slice of the annotation columns."""
    out = []
    raw = table["raw"].to_pylist()
    cols = {k: table[c].to_pylist() for k, c in zip((*_INT_FIELDS, "bbox", "area", "segmentation"),
            ("id", "image_id", "category_id", "iscrowd", "bbox", "area", "polygons"))}  # fmt: skip
    for i, r in enumerate(raw):
        if r is not None:
            out.append(json.loads(r))  # maybe not an object: an error row says so
        else:
            out.append({k: v[i] for k, v in cols.items() if v[i] is not None})
    return out


def duplicate_flags(annotations: pa.Table) -> np.ndarray:
    """bool per annotation: an earlier annotation of the file has the same id (first one wins)."""
    keys = annotations["id"]
    flags = np.zeros(len(keys), bool)
    valid = np.flatnonzero(keys.is_valid().to_numpy(zero_copy_only=False))
    values = keys.drop_null().to_numpy()
    order = np.argsort(values, kind="stable")
    repeat = np.zeros(len(values), bool)
    repeat[1:] = values[order][1:] == values[order][:-1]
    flags[valid[order[repeat]]] = True
    # ids that are not integers (rare, irregular rows): compare them as Python values
    odd = np.flatnonzero(~keys.is_valid().to_numpy(zero_copy_only=False))
    seen: list[Any] = []
    for i, r in zip(odd, annotations["raw"].take(pa.array(odd)).to_pylist()):
        a = json.loads(r) if r is not None else {}
        v = a.get("id") if isinstance(a, dict) else None
        if v is None:
            continue
        flags[i] = v in seen
        seen.append(v)
    return flags


def plan_shards(annotations: pa.Table, shard_images: int) -> np.ndarray:
    """int32 shard per annotation: images sorted by id, ``shard_images`` per shard (id-less: 0)."""
    if shard_images < 1:
        raise ValueError(f"shard_images must be >= 1, got {shard_images}")
    keys = annotations["image_id"]
    shards = np.zeros(len(keys), np.int32)
    valid = keys.is_valid().to_numpy(zero_copy_only=False)
    _, rank = np.unique(keys.drop_null().to_numpy(), return_inverse=True)
    shards[valid] = rank // shard_images
    return shards


def prepare_shard(
    annotations: pa.Table,
    duplicate: np.ndarray,
    images: pa.Table,
    categories: list[int],
    image_root: str | None,
    num_threads: int = 8,
    max_pixels: int = DataConfig.max_image_pixels,
    max_bytes: int | None = DataConfig.max_image_bytes,
) -> tuple[pa.Table, pa.Table]:
    """(instances, errors) of one shard, each with a leading ``seq`` column (file position).

    Args:
        annotations: the shard's rows of the annotation columns (with ``seq``).
        duplicate: bool per row (:func:`duplicate_flags`).
        images: image table (IMAGE_SCHEMA, sorted by id); only the shard's images are used.
        categories: known category ids.
        image_root: URI prefix of the images; None skips the header checks.
        max_pixels: images declared or stored larger are error rows (``data.max_image_pixels``).
        max_bytes: image files larger are error rows, refused before a byte is read
            (``data.max_image_bytes``; None: no limit).
    """
    keys = np.unique(annotations["image_id"].drop_null().to_numpy())
    ids = images["id"].to_numpy()
    at = np.clip(np.searchsorted(ids, keys), 0, max(len(ids) - 1, 0))
    hit = at[ids[at] == keys] if len(ids) else at[:0]
    entries = []
    for i in hit:
        d = json.loads(images["image"][int(i)].as_py())
        entries.extend(d["_entries"] if "_entries" in d else [d])
    imgs, bad_images = validate.check_images(entries, max_pixels, file_name_error(image_root))
    checks = {}
    if image_root is not None and imgs:
        used = sorted(imgs)
        names = [validate.image_file_name(imgs[i]) for i in used]
        results = check_images(
            [image_uri(image_root, n) for n in names], num_threads,
            expected=[(imgs[i]["height"], imgs[i]["width"]) for i in used],
            max_pixels=max_pixels, names=[repr(n) for n in names], max_bytes=max_bytes,
        )  # fmt: skip
        checks = dict(zip(used, results))
    seq = annotations["seq"].to_numpy()
    anns = [validate.annotation_ids(a, int(k)) for a, k in zip(annotation_dicts(annotations), seq)]
    rows, errors, is_instance = build_instances(
        anns, imgs, set(categories), checks, duplicate, bad_images
    )
    inst = pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)
    err = pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)
    return inst.add_column(0, "seq", pa.array(seq[is_instance])), err.add_column(
        0, "seq", pa.array(seq[~is_instance])
    )


def prepare_in_process(
    columns: CocoColumns,
    image_root: str | None,
    num_threads: int = 8,
    max_pixels: int = DataConfig.max_image_pixels,
    max_bytes: int | None = DataConfig.max_image_bytes,
) -> tuple[pa.Table, pa.Table]:
    """(instances, errors) of the whole file, in memory and in file order."""
    ann = columns.annotations
    inst, err = prepare_shard(ann, duplicate_flags(ann), columns.images, columns.categories,
                              image_root, num_threads, max_pixels, max_bytes)  # fmt: skip
    return inst.drop_columns(["seq"]), err.drop_columns(["seq"])


def load_instances(
    annotations: str,
    images: str,
    check_files: bool = True,
    num_threads: int = 8,
    max_pixels: int = DataConfig.max_image_pixels,
    max_bytes: int | None = DataConfig.max_image_bytes,
) -> tuple[pa.Table, pa.Table]:
    """Load a COCO-format json (local or s3) into (instances, errors) Arrow tables, in file order.

    In-process and in memory (tests, benches, small sets); the pipeline's ``prepare`` writes a
    sharded dataset with Ray instead (:func:`exits.data.prepare.prepare_instances`).

    Args:
        annotations: URI of the COCO / LVIS v1 / VOC-as-COCO json.
        images: URI prefix that the images' ``file_name`` (LVIS: ``coco_url`` path) is relative to.
        check_files: read every referenced image's header once to catch missing/unreadable
            files, oversized images and size mismatches (grayscale/RGBA/16-bit are normalised at
            decode time).
        num_threads: image-check threads.
        max_pixels: images declared or stored larger than this are error rows
            (``data.max_image_pixels``); checked before any decode.
        max_bytes: image files larger are error rows (``data.max_image_bytes``; None: no
            limit); checked from the file's size before a byte is read.

    Raises:
        ValueError: a file that is not a COCO-format json object (one line, no traceback
            from the parser); every problem inside it is an error row instead.
    """
    columns = load_columns(annotations)
    return prepare_in_process(columns, images if check_files else None, num_threads=num_threads,
                              max_pixels=max_pixels, max_bytes=max_bytes)  # fmt: skip


def _errors_uri(work: str, shard: int) -> str:
    return storage.join(work, "errors-" + PART_FORMAT.format(shard))


def _prepare_shard_task(
    batch: pa.Table,
    *,
    work: str,
    table_uri: str,
    images: pa.Table,
    categories: list[int],
    image_root: str | None,
    num_threads: int,
    max_pixels: int,
    max_bytes: int | None = DataConfig.max_image_bytes,
) -> pa.Table:
    """Ray Data task over shard numbers: input part -> instance part + error part, stats row."""
    cv2.setNumThreads(1)  # one task per CPU already: no nested OpenCV threads
    stats = []
    for shard in batch["shard"].to_pylist():
        started, cpu_started = time.time(), time.process_time()
        part = read_table(storage.join(work, PART_FORMAT.format(shard)))
        dup = part["duplicate"].to_numpy(zero_copy_only=False)
        inst, err = prepare_shard(part.drop_columns(["duplicate"]), dup, images, categories,
                                  image_root, num_threads, max_pixels, max_bytes)  # fmt: skip
        write_table(inst.drop_columns(["seq"]), storage.join(table_uri, PART_FORMAT.format(shard)))
        write_table(err, _errors_uri(work, shard))
        stats.append({"shard": shard, "instances": inst.num_rows, "errors": err.num_rows,
                      "separated": int(pc.sum(inst["separated"]).as_py() or 0),
                      "seconds": time.time() - started,
                      "cpu_s": time.process_time() - cpu_started,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})  # fmt: skip
    return pa.Table.from_pylist(stats)


def _truncate(table_uri: str, max_instances: int) -> int:
    """Keep the first ``max_instances`` rows of a sharded table (parts in order); rows kept."""
    kept = 0
    for uri in storage.list_dir(table_uri):
        part = read_table(uri)
        if kept + part.num_rows > max_instances:
            if kept >= max_instances and kept > 0:
                storage.remove(uri)
                continue
            write_table(part.slice(0, max_instances - kept), uri)
        kept += min(part.num_rows, max_instances - kept)
    return kept


def prepare_instances(
    annotations: str,
    image_root: str,
    table_uri: str,
    errors_uri: str,
    *,
    shard_images: int = 500,
    check_files: bool = True,
    num_threads: int = 8,
    max_instances: int = 0,
    max_pixels: int = DataConfig.max_image_pixels,
    max_bytes: int | None = DataConfig.max_image_bytes,
    use_ray: bool | None = None,
) -> dict[str, Any]:
    """Write the instance table of a COCO-format json as Parquet parts, and its errors.

    Args:
        annotations: URI of the COCO / LVIS v1 / VOC-as-COCO json.
        image_root: URI prefix the images' ``file_name`` (LVIS: ``coco_url`` path) is relative to.
        table_uri: directory of the instance table: ``<table_uri>/part-NNNNN.parquet``, one part
            per image shard, rows by (image shard, file order); replaced when it exists.
        errors_uri: one Parquet file of error rows (coco.ERROR_SCHEMA).
        shard_images: images per shard (the unit of a Ray task).
        check_files: read each referenced image's header (missing, unreadable, size mismatch).
        max_instances: >0 keeps the first N instance rows (parts in order) for quick runs.
        max_pixels: images declared or stored larger are error rows (``data.max_image_pixels``).
        max_bytes: image files larger are error rows (``data.max_image_bytes``; None: no limit),
            refused from their size before a byte is read, so no later stage reads them.
        use_ray: run shards as Ray Data tasks; None: when Ray is initialised.

    Returns:
        {"instances", "errors", "separated", "annotations", "shards", "parse_s", "shards_s",
         "parse_cpu_s" (driver), "shards_cpu_s" (all shard tasks), "worker_peak_rss_bytes"}.
    """
    started, cpu_started = time.time(), time.process_time()
    columns = load_columns(annotations)
    ann = columns.annotations
    n_annotations = ann.num_rows
    shards = plan_shards(ann, shard_images)
    # one contiguous copy: a take from many chunks of nested lists copies them all each time
    ann = ann.append_column("duplicate", pa.array(duplicate_flags(ann))).combine_chunks()
    order = np.argsort(shards, kind="stable")
    num_shards = int(shards.max()) + 1 if len(shards) else 0
    starts = np.searchsorted(shards[order], np.arange(num_shards + 1))
    work = table_uri.rstrip("/") + ".work"
    storage.remove(table_uri)
    storage.remove(work)
    for s in range(num_shards):  # one shard at a time: no sorted copy of the whole table
        rows = pa.array(order[starts[s] : starts[s + 1]])
        write_table(ann.take(rows), storage.join(work, PART_FORMAT.format(s)))
    del ann, order, shards
    parse_s, parse_cpu_s = time.time() - started, time.process_time() - cpu_started
    kwargs = {"work": work, "table_uri": table_uri, "images": columns.images,
              "categories": columns.categories,
              "image_root": image_root if check_files else None, "num_threads": num_threads,
              "max_pixels": max_pixels, "max_bytes": max_bytes}  # fmt: skip
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    if use_ray and num_shards:
        import ray

        ds = ray.data.from_items([{"shard": s} for s in range(num_shards)],
                                 override_num_blocks=num_shards)  # fmt: skip
        ds = ds.map_batches(_prepare_shard_task, batch_size=1, batch_format="pyarrow",
                            fn_kwargs=kwargs, num_cpus=1)  # fmt: skip
        stats = ds.take_all()
    else:
        stats = [r for s in range(num_shards)
                 for r in _prepare_shard_task(pa.table({"shard": [s]}), **kwargs).to_pylist()]  # fmt: skip
    if len(stats) != num_shards:
        raise RuntimeError(f"prepare: {len(stats)} of {num_shards} shards reported back")
    if not num_shards:
        write_table(INSTANCE_SCHEMA.empty_table(), storage.join(table_uri, PART_FORMAT.format(0)))
    err_parts = [read_table(_errors_uri(work, s)).drop_columns(["seq"]) for s in range(num_shards)]
    errors = pa.concat_tables(err_parts) if err_parts else ERROR_SCHEMA.empty_table()
    write_table(errors, errors_uri)
    storage.remove(work)
    n_inst = sum(r["instances"] for r in stats)
    separated = sum(r["separated"] for r in stats)
    if 0 < max_instances < n_inst:
        n_inst = _truncate(table_uri, max_instances)
        separated = int(pc.sum(read_table(table_uri, ["separated"])["separated"]).as_py() or 0)
    if n_inst + errors.num_rows != n_annotations and not max_instances:
        raise RuntimeError(f"prepare lost rows: {n_inst} + {errors.num_rows} != {n_annotations}")
    return {"instances": n_inst, "errors": errors.num_rows, "separated": separated,
            "annotations": n_annotations, "shards": num_shards, "parse_s": round(parse_s, 3),
            "shards_s": round(time.time() - started - parse_s, 3),
            "parse_cpu_s": round(parse_cpu_s, 3),
            "shards_cpu_s": round(sum(r["cpu_s"] for r in stats), 3),
            "worker_peak_rss_bytes": max((r["peak_rss_bytes"] for r in stats), default=0)}  # fmt: skip


if __name__ == "__main__":  # pragma: no cover - tiny CLI for inspection
    import argparse

    p = argparse.ArgumentParser(description="COCO json -> instance table (Parquet parts)")
    p.add_argument("annotations")
    p.add_argument("images")
    p.add_argument("--out", required=True, help="output directory (local or s3)")
    a = p.parse_args()
    counts = prepare_instances(a.annotations, a.images, storage.join(a.out, "instances.parquet"),
                               storage.join(a.out, "errors.parquet"))  # fmt: skip
    print(json.dumps({**counts, "out": os.path.abspath(a.out)}))
