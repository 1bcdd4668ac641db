"""COCO-format annotations (COCO, LVIS v1, VOC converted to COCO json) -> instance table.

Public entry point: :func:`load_instances`. Every input annotation ends up exactly once in the
instance table or in the errors table: ``len(instances) + len(errors) == len(annotations)``.

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

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from exits import storage
from exits.config import DataConfig
from exits.data import validate
from exits.data.crops import instance_box
from exits.data.extreme_points import (
    extreme_points_from_mask,
    extreme_points_from_polygons,
    validate_extreme_points,
)
from exits.data.images import ImageError, image_uri, load_image

LVIS_URL_PREFIXES = ("http://images.cocodataset.org/", "https://images.cocodataset.org/")
SEPARATED_MIN_COMPONENTS = 2
CONNECTIVITY = 8  # connected components of GT masks, 8-neighbourhood

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


def image_file_name(img: dict) -> str:
    """Relative image path: ``file_name``, or for LVIS the path part of ``coco_url``."""
    if img.get("file_name"):
        return img["file_name"]
    url = img.get("coco_url", "")
    for prefix in LVIS_URL_PREFIXES:
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url.rsplit("/", 1)[-1]


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
    n, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=CONNECTIVITY)
    return n - 1


def _check_image(job: tuple[str, tuple[int, int] | None, int | None, str]) -> ImageCheck:
    uri, expected, max_pixels, name = job
    try:
        img = load_image(uri, expected, max_pixels, name=name)
    except ImageError as e:
        return ImageCheck(error=e.reason)
    return ImageCheck(height=img.shape[0], width=img.shape[1])


def check_images(
    uris: list[str],
    num_threads: int = 8,
    expected: list[tuple[int, int]] | None = None,
    max_pixels: int | None = None,
    names: list[str] | None = None,
) -> list[ImageCheck]:
    """Decode every image once (in threads) to catch missing/corrupt files and real sizes;
    the header's size is checked against ``expected`` (H, W) and ``max_pixels`` first."""
    jobs = [(u, expected[k] if expected else None, max_pixels, names[k] if names else u)
            for k, u in enumerate(uris)]  # fmt: skip
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return list(pool.map(_check_image, jobs))


def _instance_from_annotation(ann: dict, img: dict, file_name: str) -> dict:
    """Build one instance row; raises ValueError with a reason for unusable records."""
    h, w = int(img["height"]), int(img["width"])
    segm = validate.check_segmentation(ann.get("segmentation"), h, w)  # before pycocotools
    rle = segmentation_to_rle(segm, h, w)
    mask = mask_utils.decode(rle) if rle is not None else None
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
        points, source = extreme_points_from_mask(mask), "mask"
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


def _file_name_error(images: str | None):
    def check(img: dict) -> str | None:
        try:
            name = image_file_name(img)
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
    data: dict,
    images: str | None,
    check_files: bool = True,
    num_threads: int = 8,
    max_pixels: int = DataConfig.max_image_pixels,
) -> tuple[pa.Table, pa.Table]:
    """Instance and error tables from a parsed COCO-format dict (see :func:`load_instances`)."""
    data = validate.check_structure(data)
    anns = [validate.annotation_ids(a, k) for k, a in enumerate(data["annotations"])]
    imgs, bad_images = validate.check_images(data["images"], max_pixels, _file_name_error(images))
    cats = validate.check_categories(data["categories"])
    checks: dict[int, ImageCheck] = {}
    if check_files and images is not None:
        used = sorted({a.get("image_id") for a, r in anns if not r and a.get("image_id") in imgs})
        results = check_images(
            [image_uri(images, image_file_name(imgs[i])) for i in used], num_threads,
            expected=[(imgs[i]["height"], imgs[i]["width"]) for i in used], max_pixels=max_pixels,
            names=[repr(image_file_name(imgs[i])) for i in used],
        )  # fmt: skip
        checks = dict(zip(used, results))
    rows, errors, seen = [], [], set()
    for ann, reason in anns:
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if reason:
            errors.append(error_row(ann_id, image_id, "prepare", reason))
            continue
        if ann_id in seen:
            errors.append(error_row(ann_id, image_id, "prepare", "duplicate annotation id"))
            continue
        seen.add(ann_id)
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
        if ann.get("iscrowd", 0):
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
        if check is not None and (check.height, check.width) != (
            int(img["height"]),
            int(img["width"]),
        ):
            errors.append(
                error_row(ann_id, image_id, "prepare",
                          f"image size {check.width}x{check.height} differs from annotation {img['width']}x{img['height']}")
            )  # fmt: skip
            continue
        try:
            rows.append(_instance_from_annotation(ann, img, image_file_name(img)))
        except (ValueError, KeyError, TypeError) as e:
            errors.append(error_row(ann_id, image_id, "prepare", str(e)))
    instances = pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)
    return instances, pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)


def load_instances(
    annotations: str,
    images: str,
    check_files: bool = True,
    num_threads: int = 8,
    max_pixels: int = DataConfig.max_image_pixels,
) -> tuple[pa.Table, pa.Table]:
    """Load a COCO-format json (local or s3) into (instances, errors) Arrow tables.

    Args:
        annotations: URI of the COCO / LVIS v1 / VOC-as-COCO json.
        images: URI prefix that the images' ``file_name`` (LVIS: ``coco_url`` path) is relative to.
        check_files: decode every referenced image once to catch missing/corrupt files and size
            mismatches (grayscale/RGBA/16-bit are normalised at decode time, not errors).
        num_threads: decoding threads.
        max_pixels: images declared or stored larger than this are error rows
            (``data.max_image_pixels``); checked before any decode.

    Raises:
        ValueError: a file that is not a COCO-format json object (one line, no traceback
            from the parser); every problem inside it is an error row instead.
    """
    data = validate.read_coco_json(annotations)
    return build_instances(
        data, images, check_files=check_files, num_threads=num_threads, max_pixels=max_pixels
    )


def write_table(table: pa.Table, uri: str) -> None:
    """Write a table as a single Parquet file at ``uri`` (published atomically)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.publish_bytes(uri, sink.getvalue().to_pybytes())


def read_table(uri: str) -> pa.Table:
    fs, path = storage.get_filesystem(uri)
    return pq.read_table(path, filesystem=fs)


def instance_mask(row: dict) -> np.ndarray | None:
    """(H, W) bool GT mask of an instance-table row (None without GT)."""
    if not row.get("gt_segmentation"):
        return None
    rle = json.loads(row["gt_segmentation"])
    return mask_utils.decode(rle).astype(bool)


if __name__ == "__main__":  # pragma: no cover - tiny CLI for inspection
    import argparse

    p = argparse.ArgumentParser(description="COCO json -> instance table (Parquet)")
    p.add_argument("annotations")
    p.add_argument("images")
    p.add_argument("--out", required=True, help="output directory (local or s3)")
    a = p.parse_args()
    inst, err = load_instances(a.annotations, a.images)
    write_table(inst, storage.join(a.out, "instances.parquet"))
    write_table(err, storage.join(a.out, "errors.parquet"))
    print(
        json.dumps(
            {"instances": inst.num_rows, "errors": err.num_rows, "out": os.path.abspath(a.out)}
        )
    )
