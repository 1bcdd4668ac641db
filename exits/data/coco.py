"""COCO-format annotations (COCO, LVIS v1, VOC converted to COCO json) -> instance table.

Per-annotation and per-shard logic: :func:`build_instances` (the checks, run per image shard) and
:func:`_instance_from_annotation` (one row; polygons rasterised in their box only). The pipeline
runs it as Ray Data tasks via :mod:`exits.data.prepare` (which also holds the in-memory entry
point for small sets, ``load_instances``; this module imports nothing above it). Every input
annotation ends up exactly once in the instance table or in the errors table:
``len(instances) + len(errors) == len(annotations)``.

Instance table columns (Arrow/Parquet):
  image_id int64, ann_id int64, category_id int64, file_name string, height int32, width int32,
  bbox list<float64>[4] (COCO xywh), extreme_points list<list<int32>[2]>[4] (top, left, bottom,
  right; each (x, y); null for boxes-only input), iscrowd bool, area float64,
  separated bool (GT mask has >= 2 connected components; null without GT masks),
  supervision string ("extreme_points" | "box": box-only records fall back to box supervision),
  points_source string ("json" | "polygon" | "mask" | "none"), gt_segmentation string
  (COCO RLE as json; null without GT masks).
Errors table columns: ann_id int64, image_id int64, stage string, reason string.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from exits import storage
from exits.data import validate
from exits.data.crops import instance_box
from exits.data.extreme_points import (
    extreme_points_from_mask,
    extreme_points_from_polygons,
    validate_extreme_points,
)
from exits.data.images import ImageError, image_uri, read_image_size

SEPARATED_MIN_COMPONENTS = 2
CONNECTIVITY = 8  # connected components of GT masks, 8-neighbourhood
RLE_POLY_SCALE = 5  # pycocotools rasterises polygons on a 5x finer grid (rleFrPoly)

INSTANCE_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("ann_id", pa.int64()),
        ("category_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bbox", pa.list_(pa.float64(), 4)),
        ("extreme_points", pa.list_(pa.list_(pa.int32(), 2), 4)),
        ("iscrowd", pa.bool_()),
        ("area", pa.float64()),
        ("separated", pa.bool_()),
        ("supervision", pa.string()),
        ("points_source", pa.string()),
        ("gt_segmentation", pa.string()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("ann_id", pa.int64()),
        ("image_id", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass
class ImageCheck:
    """Result of decoding one image: its real size, or why it is unusable."""

    height: int | None = None
    width: int | None = None
    error: str | None = None


def error_row(ann_id: Any, image_id: Any, stage: str, reason: str) -> dict:
    """An error row; ids that are not JSON integers (the reason names them) become null."""
    return {
        "ann_id": validate.id_or_none(ann_id),
        "image_id": validate.id_or_none(image_id),
        "stage": stage,
        "reason": reason,
    }


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict | None:
    """COCO polygons / uncompressed RLE / compressed RLE -> compressed RLE (None when absent)."""
    if segm is None or (isinstance(segm, list) and len(segm) == 0):
        return None
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            raise ValueError("polygon with fewer than 3 vertices")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and "counts" in segm:
        rle = {"size": segm["size"], "counts": segm["counts"]}
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"segmentation size {list(rle['size'])} != image size {[height, width]}")
    return rle


def rle_to_json(rle: dict) -> str:
    counts = rle["counts"]
    return json.dumps(
        {
            "size": list(rle["size"]),
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
        }
    )


def num_components(mask: np.ndarray) -> int:
    n, _ = cv2.connectedComponentsWithAlgorithm(
        mask.astype(np.uint8, copy=False), CONNECTIVITY, cv2.CV_32S, cv2.CCL_WU
    )
    return n - 1


def _check_image(
    job: tuple[str, tuple[int, int] | None, int | None, str, int | None],
) -> ImageCheck:
    """Header-only check (exists, a regular file within the byte limit, recognised format,
    pixel limit, declared size); the labeller decodes the pixels."""
    uri, expected, max_pixels, name, max_bytes = job
    try:
        height, width = read_image_size(uri, expected, max_pixels, name=name, max_bytes=max_bytes)
    except ImageError as e:
        return ImageCheck(error=e.reason)
    return ImageCheck(height=height, width=width)


def check_images(
    uris: list[str],
    num_threads: int = 8,
    expected: list[tuple[int, int]] | None = None,
    max_pixels: int | None = None,
    names: list[str] | None = None,
    max_bytes: int | None = None,
) -> list[ImageCheck]:
    """Check every image's header once (in threads): missing/unreadable files and real sizes;
    a file larger than ``max_bytes`` (``data.max_image_bytes``; None: no limit) is refused
    before it is read, and the header's size is checked against ``expected`` (H, W) and
    ``max_pixels``."""
    jobs = [(u, expected[k] if expected else None, max_pixels, names[k] if names else u,
             max_bytes) for k, u in enumerate(uris)]  # fmt: skip
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return list(pool.map(_check_image, jobs))


def polygon_box_mask(
    polygons: list, height: int, width: int, rle: dict | None = None
) -> tuple[np.ndarray, int, int]:
    """Rasterise COCO polygons inside their box instead of the whole image.

    Args:
        polygons: COCO polygons, flat ``[x0, y0, x1, y1, ...]`` lists (fewer than 3 vertices
            are dropped, as in :func:`segmentation_to_rle`).
        height, width: image size.
        rle: the polygons' full-image RLE (:func:`segmentation_to_rle`); when given, the
            window's area is checked against it and the full image is decoded on a difference.

    Returns:
        ``(mask, x0, y0)``: mask (bh, bw) uint8 equal to the window ``[y0:y0+bh, x0:x0+bw]`` of
        ``decode(merge(frPyObjects(polygons, height, width)))``, which is zero outside it.

    pycocotools snaps each vertex to the grid ``(int)(5 v + 0.5)`` and rasterises in integers
    from there; we snap the same way, shift the grid by whole pixels (exact in integers) and
    pass the vertices as ``k / 5``, which snap back to exactly ``k``. An axis whose window starts
    at 0 is passed unchanged, so clamping at the image border is the same as for the full image.
    One float step of its rasteriser, ``(int)(y + s * t + 0.5)``, rounds by the magnitude of the
    shifted coordinate: rarely (1 in ~600 random polygons, 0 of COCO's 887) a boundary pixel
    moves, so with ``rle`` given the area check catches it and the full image is used instead.
    """
    polys = [p[: len(p) // 2 * 2] for p in polygons if len(p) >= 6]
    if not polys:
        raise ValueError("polygon with fewer than 3 vertices")
    xy = np.fromiter(itertools.chain.from_iterable(polys), np.float64).reshape(-1, 2)
    grid = np.trunc(RLE_POLY_SCALE * xy + 0.5)  # C's (int) cast truncates
    if not np.isfinite(grid).all():
        raise ValueError("polygon coordinates contain NaN or inf")
    lo = np.maximum(np.floor(grid.min(0) / RLE_POLY_SCALE) - 1, 0)  # (x0, y0) of the window
    hi = np.minimum(np.floor(grid.max(0) / RLE_POLY_SCALE) + 2, [width, height])
    (x0, y0), (x1, y1) = lo.astype(np.int64).tolist(), hi.astype(np.int64).tolist()
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.uint8), 0, 0  # the polygon lies outside the image
    for axis, offset in ((0, x0), (1, y0)):
        if offset > 0:
            xy[:, axis] = (grid[:, axis] - RLE_POLY_SCALE * offset) / RLE_POLY_SCALE
    flat, ends = xy.ravel(), np.cumsum([0] + [len(p) for p in polys]).tolist()
    parts = [flat[a:b] for a, b in zip(ends[:-1], ends[1:])]
    rles = mask_utils.frPyObjects(parts, y1 - y0, x1 - x0)
    mask = mask_utils.decode(rles[0] if len(rles) == 1 else mask_utils.merge(rles))
    if rle is not None and int(mask.sum()) != int(mask_utils.area(rle)):
        return mask_utils.decode(rle), 0, 0
    return mask, x0, y0


def _instance_from_annotation(ann: dict, img: dict, file_name: str) -> dict:
    """Build one instance row; raises ValueError with a reason for unusable records."""
    h, w = int(img["height"]), int(img["width"])
    segm = validate.check_segmentation(ann.get("segmentation"), h, w)  # before pycocotools
    rle = segmentation_to_rle(segm, h, w)
    # the GT mask only inside its window (x0, y0): polygons are rasterised in their box
    mask, x0, y0 = None, 0, 0
    if rle is not None and isinstance(segm, list):
        mask, x0, y0 = polygon_box_mask(segm, h, w, rle)
    elif rle is not None:
        mask = mask_utils.decode(rle)
    if mask is not None and not mask.any():
        raise ValueError("empty GT mask")
    points, source = None, "none"
    if ann.get("extreme_points") is not None:
        points = validate.check_extreme_points(ann["extreme_points"])
        points, source = np.rint(points).astype(np.int32), "json"
    elif isinstance(segm, list) and segm:
        points, source = extreme_points_from_polygons(segm), "polygon"
        # polygon vertices may sit on the far edge (x == width): clamp into the image
        points = np.minimum(np.maximum(points, 0), [w - 1, h - 1]).astype(np.int32)
    elif mask is not None:
        points, source = extreme_points_from_mask(mask) + np.int32([x0, y0]), "mask"
    if points is not None:
        reason = validate_extreme_points(points, h, w)
        if reason:
            raise ValueError(f"degenerate extreme points: {reason}")
        x0, y0 = points[1, 0], points[0, 1]
        bbox = [float(x0), float(y0), float(points[3, 0] + 1 - x0), float(points[2, 1] + 1 - y0)]
    else:
        box, _, reason = instance_box(None, ann.get("bbox"), h, w)
        if reason:
            raise ValueError(reason)
        bbox = [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
    area = (
        float(mask_utils.area(rle))
        if rle is not None
        else float(ann.get("area", bbox[2] * bbox[3]))
    )
    return {
        "image_id": int(ann["image_id"]),
        "ann_id": int(ann["id"]),
        "category_id": int(ann["category_id"]),
        "file_name": file_name,
        "height": h,
        "width": w,
        "bbox": bbox,
        "extreme_points": points.tolist() if points is not None else None,
        "iscrowd": bool(ann.get("iscrowd", 0)),
        "area": area,
        "separated": (num_components(mask) >= SEPARATED_MIN_COMPONENTS)
        if mask is not None
        else None,
        "supervision": "extreme_points" if points is not None else "box",
        "points_source": source,
        "gt_segmentation": rle_to_json(rle) if rle is not None else None,
    }


def file_name_error(images: str | None):
    """``check(img) -> reason | None``: the entry's file name resolves inside ``images``."""

    def check(img: dict) -> str | None:
        try:
            name = validate.image_file_name(img)
            if images is not None:
                image_uri(images, name)
            elif not isinstance(name, str) or not name:
                raise ImageError(f"image {img.get('id')} has no file_name")
        except ImageError as e:
            return e.reason
        except (AttributeError, TypeError):  # e.g. a coco_url that is not a string
            return f"image {img.get('id')} has no usable file_name or coco_url"
        return None

    return check


def build_instances(
    anns: list[tuple[dict, str | None]],
    imgs: dict[int, dict],
    cats: set[int],
    checks: dict[int, ImageCheck],
    duplicate: list[bool] | np.ndarray,
    bad_images: dict[int, str] | None = None,
) -> tuple[list[dict], list[dict], np.ndarray]:
    """Instance and error rows of one shard of annotations (run per image shard).

    Args:
        anns: the shard's annotations in file order, each as (dict with int ids, reason it is
            unusable or None) (:func:`exits.data.validate.annotation_ids`).
        imgs: usable image id -> image dict (at least the shard's images).
        cats: known category ids.
        checks: image id -> header check, sizes already compared with the entry (empty: files
            not checked).
        duplicate: per annotation, whether an earlier annotation of the file has its id
            (decided over the whole file by :func:`exits.data.prepare.duplicate_flags`).
        bad_images: image id -> why that image entry is unusable
            (:func:`exits.data.validate.check_images`).

    Returns:
        (instance rows, error rows, bool array: which annotations became instance rows).
    """
    bad_images = bad_images or {}
    rows, errors, is_instance = [], [], np.zeros(len(anns), bool)
    for k, (ann, reason) in enumerate(anns):
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if reason:
            errors.append(error_row(ann_id, image_id, "prepare", reason))
            continue
        if duplicate[k]:
            errors.append(error_row(ann_id, image_id, "prepare", "duplicate annotation id"))
            continue
        if image_id in bad_images:
            errors.append(error_row(ann_id, image_id, "prepare", bad_images[image_id]))
            continue
        if image_id not in imgs:
            errors.append(error_row(ann_id, image_id, "prepare", f"unknown image id {image_id}"))
            continue
        if ann.get("category_id") not in cats:
            errors.append(
                error_row(
                    ann_id, image_id, "prepare", f"unknown category id {ann.get('category_id')}"
                )
            )
            continue
        try:
            crowd = validate.crowd_flag(ann.get("iscrowd", 0))
        except ValueError as e:
            errors.append(error_row(ann_id, image_id, "prepare", str(e)))
            continue
        if crowd:
            errors.append(
                error_row(
                    ann_id, image_id, "prepare", "skipped: crowd annotation (not an instance)"
                )
            )
            continue
        img = imgs[image_id]
        check = checks.get(image_id)
        if check is not None and check.error:
            errors.append(error_row(ann_id, image_id, "prepare", check.error))
            continue
        try:
            rows.append(_instance_from_annotation(ann, img, validate.image_file_name(img)))
            is_instance[k] = True
        except (ValueError, KeyError, TypeError) as e:
            errors.append(error_row(ann_id, image_id, "prepare", str(e)))
    return rows, errors, is_instance


def write_table(table: pa.Table, uri: str) -> None:
    """Write a table as a single Parquet file at ``uri`` (published atomically)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.publish_bytes(uri, sink.getvalue().to_pybytes())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, or a directory of Parquet parts (a sharded table) read as one table."""
    fs, path = storage.get_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_dataset(uri: str) -> ds.Dataset | None:
    """A Parquet file or a directory of Parquet parts (local or s3) as a ``pyarrow.dataset``,
    for reads in record batches or with filters, columns needed only; None when nothing is
    there. In a directory only ``*.parquet`` files count (not a temp file being published)."""
    if not storage.exists(uri):
        return None
    fs, path = storage.get_filesystem(uri)
    if storage.is_dir(uri):
        prefix = len("s3://") if storage.is_s3(uri) else 0
        path = [f[prefix:] for f in storage.list_dir(uri) if f.endswith(".parquet")]
        if not path:
            return None
    return ds.dataset(path, filesystem=fs, format="parquet")


def scan_batches(
    data: ds.Dataset | ds.Fragment, columns: Sequence[str], batch_size: int
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` (those ``data`` has), <= ``batch_size`` rows, one part
    and one batch at a time: pyarrow's default read-ahead (16 batches, 4 parts in flight)
    makes a reader's memory grow with the number of parts up to 4 of them, and even with
    read-ahead 1 a whole-dataset scan held ~3x one part's Arrow memory at 8 parts (the eval's
    box baseline at 50 k instances: 21 vs 9 MB), so a dataset is scanned part by part."""
    if isinstance(data, ds.Dataset):
        for fragment in data.get_fragments():
            yield from scan_batches(fragment, columns, batch_size)
        return
    have = [c for c in columns if c in data.physical_schema.names]
    yield from data.to_batches(columns=have, batch_size=batch_size, batch_readahead=1,
                               fragment_readahead=1)  # fmt: skip


def filter_table(data: ds.Dataset, columns: Sequence[str], expression: ds.Expression) -> pa.Table:
    """The rows of ``data`` matching ``expression``, ``columns`` only (those it has), read one
    part and one batch at a time (``Dataset.to_table``'s default read-ahead keeps 4 parts in
    flight)."""
    have = [c for c in columns if c in data.schema.names]
    batches = [b for f in data.get_fragments()
               for b in f.to_batches(columns=have, filter=expression, batch_readahead=1)]  # fmt: skip
    return pa.Table.from_batches(batches) if batches else data.schema.select(have).empty_table()


def instance_mask(row: dict) -> np.ndarray | None:
    """(H, W) bool GT mask of an instance-table row (None without GT)."""
    if not row.get("gt_segmentation"):
        return None
    rle = json.loads(row["gt_segmentation"])
    return mask_utils.decode(rle).astype(bool)
