"""Hostile-input checks for COCO-format jsons, run before pycocotools or any pixel buffer sees
a value: structure, ids, image entries (size limits, file names), polygons, RLEs, extreme
points. Every check is a pure function that returns a clean value or raises ``ValueError``
with the reason that goes into the error row, so one bad record costs one error row, never the
job (``exits.data.coco`` calls these; ``exits.evaluate`` reuses the geometry checks).

Rules:
  * ids (annotation, image, category) are JSON integers in the int64 range; an integral float
    (``7.0``) counts as that integer; strings, other floats, booleans are errors.
  * an image entry needs an int id, integer ``height``/``width`` >= 1 whose product is at most
    ``max_pixels`` and a file name inside the images root (``exits.data.images.image_uri``);
    two entries with one id make every annotation on that id an error row (never a guess).
  * polygons: flat lists of an even number (>= 6) of finite numbers within the image (plus a
    margin of :data:`POLYGON_MARGIN` of a side + 2 px; then clipped onto it): pycocotools
    rasterises every edge pixel by pixel, so a vertex at 1e9 would allocate gigabytes.
  * RLEs: ``size == [height, width]`` and counts that sum to ``height * width`` (checked by
    decoding the compressed string here: pycocotools writes out of bounds otherwise).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from exits import storage

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
POLYGON_MARGIN = 0.1  # fraction of the image side a polygon vertex may lie outside it (+2 px)
LISTS = ("images", "annotations", "categories")
LVIS_URL_PREFIXES = ("http://images.cocodataset.org/", "https://images.cocodataset.org/")


def read_coco_json(uri: str) -> dict:
    """Parse a COCO-format json; raises ``ValueError`` with a one-line reason for unreadable
    files, invalid JSON, a top level that is not an object or a top-level list field that is
    not a list (a missing ``annotations``/``images``/``categories`` key reads as empty)."""
    from exits.data.jsonstream import loads  # the one JSON reader (BOM, duplicate keys, depth)

    try:
        raw = storage.read_bytes(uri)
    except OSError as e:
        raise ValueError(f"cannot read annotations {uri}: {type(e).__name__}: {e}") from None
    return check_structure(loads(raw, f"annotations {uri}"), uri)


def check_structure(data: Any, source: str = "annotations") -> dict:
    """The top-level dict with ``images``/``annotations``/``categories`` lists (see above)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the top level must be a JSON object, got {kind(data)}")
    out = dict(data)
    for key in LISTS:
        value = out.get(key, [])
        if not isinstance(value, list):
            raise ValueError(f"{source}: {key!r} must be a list, got {kind(value)}")
        out[key] = value
    return out


def kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def crowd_flag(value: Any) -> bool:
    """``iscrowd`` as a bool: JSON true/false or 0/1 (``0.0``/``1.0`` too); anything else (the
    string ``"0"`` is truthy in Python and was taken as crowd) is a ``ValueError``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise ValueError(f"iscrowd must be a boolean or 0/1, got {str(value)[:40]!r} ({kind(value)})")


def as_id(value: Any, what: str = "id") -> int:
    """A JSON integer id as int; ``ValueError`` naming the value otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} {value!r} is not an integer")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{what} {value!r} is not an integer")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{what} {value!r} is a {type(value).__name__}, not an integer")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{what} {value} is outside the int64 range")
    return value


def id_or_none(value: Any) -> int | None:
    """:func:`as_id` or None (for error rows, whose id columns are int64)."""
    try:
        return as_id(value)
    except ValueError:
        return None


def check_categories(categories: list) -> set[int]:
    """The valid category ids (entries with another kind of id are ignored: their
    annotations become "unknown category" error rows)."""
    return {
        i for c in categories if isinstance(c, dict) and (i := id_or_none(c.get("id"))) is not None
    }


def check_image_entry(img: Any, max_pixels: int | None) -> str | None:
    """Reason an image entry is unusable (declared size; ``max_pixels`` None: no limit)."""
    if not isinstance(img, dict):
        return "image entry is not an object"
    for key in ("height", "width"):
        v = img.get(key)
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or not float(v).is_integer()
            or v < 1
        ):
            return f"image {img.get('id')!r} has no valid {key} (got {v!r})"
    h, w = int(img["height"]), int(img["width"])
    if max_pixels is not None and h * w > max_pixels:
        return f"declared image size {w}x{h} exceeds data.max_image_pixels ({max_pixels})"
    return None


def check_images(
    images: list, max_pixels: int | None, file_name_error=None
) -> tuple[dict[int, dict], dict[int, str]]:
    """(usable image entries by id, reason by id for the unusable ones).

    ``file_name_error(img) -> str | None`` checks the file name (the caller knows the root).
    """
    by_id: dict[int, list[dict]] = {}
    for img in images:
        i = id_or_none(img.get("id")) if isinstance(img, dict) else None
        if i is not None:
            by_id.setdefault(i, []).append(img)
    good: dict[int, dict] = {}
    bad: dict[int, str] = {}
    for i, entries in by_id.items():
        if len(entries) > 1:
            names = sorted({str(e.get("file_name") or e.get("coco_url")) for e in entries})
            bad[i] = f"duplicate image id {i} ({len(entries)} entries: {', '.join(names[:3])})"
            continue
        reason = check_image_entry(entries[0], max_pixels)
        if reason is None and file_name_error is not None:
            reason = file_name_error(entries[0])
        if reason:
            bad[i] = reason
        else:
            good[i] = {**entries[0], "id": i, "height": int(entries[0]["height"]),
                       "width": int(entries[0]["width"])}  # fmt: skip
    return good, bad


def annotation_ids(ann: Any, index: int) -> tuple[dict, str | None]:
    """(annotation with int ``id``/``image_id``/``category_id``, reason or None).

    On error the returned dict keeps what could be read, so the error row carries the ids
    that are valid; the reason names the annotation's position in the json.
    """
    if not isinstance(ann, dict):
        return {}, f"annotation #{index} is not an object"
    out = dict(ann)
    for key in ("id", "image_id", "category_id"):
        if key == "id" and ann.get("id") is None:
            return out, f"annotation #{index} has no id"
        try:
            out[key] = as_id(ann.get(key), f"{'annotation ' if key == 'id' else ''}{key}")
        except ValueError as e:
            out[key] = id_or_none(ann.get(key))
            return out, f"annotation #{index}: {e}"
    return out, None


NUMBER_TYPES = frozenset((int, float))  # exactly these: bool is an int subclass, not a number


def plain_numbers(seq: list) -> bool:
    """Every item's type is exactly int or float (a C-speed scan: LVIS has ~100 M coordinates)."""
    return set(map(type, seq)) <= NUMBER_TYPES


def _numbers(seq: Any, what: str) -> np.ndarray:
    if not isinstance(seq, list) or (
        not plain_numbers(seq)  # the common case ends here; subclasses (numpy floats) below
        and any(isinstance(v, bool) or not isinstance(v, int | float) for v in seq)
    ):
        raise ValueError(f"{what} must be a list of numbers")
    arr = np.asarray(seq, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or inf")
    return arr


def check_polygons(polygons: list, height: int, width: int) -> list[list[float]]:
    """Polygons (flat [x0, y0, x1, y1, ...] lists) checked and clipped onto the image."""
    out = []
    for k, poly in enumerate(polygons):
        arr = _numbers(poly, f"polygon {k}")
        if len(arr) % 2:
            raise ValueError(f"polygon {k} has an odd number of coordinates ({len(arr)})")
        if len(arr) < 6:
            continue  # fewer than 3 vertices: no area (COCO has a few; skipped, as before)
        xy = arr.reshape(-1, 2)
        mx, my = POLYGON_MARGIN * width + 2, POLYGON_MARGIN * height + 2
        bad = (
            (xy[:, 0] < -mx) | (xy[:, 0] > width + mx) | (xy[:, 1] < -my) | (xy[:, 1] > height + my)
        )
        if bad.any():
            x, y = xy[np.argmax(bad)]
            raise ValueError(
                f"polygon {k} has a vertex ({x:g}, {y:g}) outside the image {width}x{height}"
            )
        xy = np.clip(xy, 0, [width, height])
        out.append(xy.reshape(-1).tolist())
    if not out:
        raise ValueError("polygon with fewer than 3 vertices")
    return out


def rle_string_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python,
    so a malformed string is an error here instead of an out-of-bounds write in C)."""
    s = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("RLE counts string is truncated")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise ValueError("RLE counts string has an invalid character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def check_rle(segm: dict, height: int, width: int) -> None:
    """Raise ``ValueError`` unless an RLE dict fits a ``height x width`` image exactly."""
    size = segm.get("size")
    if not (isinstance(size, list) and len(size) == 2 and [id_or_none(v) for v in size] == size):
        raise ValueError(f"RLE size must be [height, width] integers, got {size!r}")
    if list(size) != [height, width]:
        raise ValueError(f"segmentation size {list(size)} != image size {[height, width]}")
    counts = segm.get("counts")
    if isinstance(counts, list):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts):
            raise ValueError("RLE counts must be non-negative integers")
    elif isinstance(counts, str | bytes):
        try:
            counts = rle_string_counts(counts)
        except UnicodeEncodeError:
            raise ValueError("RLE counts string has an invalid character") from None
        if any(v < 0 for v in counts):
            raise ValueError("RLE counts string decodes to a negative run")
    else:
        raise ValueError(f"RLE counts must be a list or a string, got {kind(counts)}")
    if sum(counts) != height * width:
        raise ValueError(f"RLE counts cover {sum(counts)} pixels, not {height}x{width}")


def check_segmentation(segm: Any, height: int, width: int) -> Any:
    """A segmentation (polygons, uncompressed or compressed RLE, or None/[]) that pycocotools
    can rasterise safely for a ``height x width`` image; polygons come back clipped."""
    if segm is None or (isinstance(segm, list) and not segm):
        return None
    if isinstance(segm, list):
        return check_polygons(segm, height, width)
    if isinstance(segm, dict):
        check_rle(segm, height, width)
        return segm
    raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")


def check_extreme_points(points: Any) -> np.ndarray:
    """Extreme points from json as a finite float (4, 2) array; ``ValueError`` otherwise."""
    flat = points if isinstance(points, list) else None
    if flat is not None and all(isinstance(p, list) for p in flat):
        flat = [v for p in flat for v in p]
    arr = _numbers(flat, "extreme_points")
    if arr.shape != (8,):
        raise ValueError(f"extreme_points must be 4 (x, y) pairs, got {len(arr)} numbers")
    return arr.reshape(4, 2)


def fill_missing_areas(data: dict) -> int:
    """Give every annotation of a COCO dict without a numeric ``area`` one, in place (mask area
    of a usable segmentation, else bbox w*h, else 0), because COCO evaluation (stage 2's
    metric) needs it; returns how many were filled."""
    from pycocotools import mask as mask_utils

    images = {id_or_none(i.get("id")): i for i in data.get("images", []) if isinstance(i, dict)}
    filled = 0
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict) or _finite_number(ann.get("area")):
            continue
        area, img = 0.0, images.get(id_or_none(ann.get("image_id")))
        try:
            h, w = int(img["height"]), int(img["width"])
            segm = check_segmentation(ann.get("segmentation"), h, w)
            if isinstance(segm, list):
                area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segm, h, w))))
            elif isinstance(segm, dict):
                rle = (
                    mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
                )
                area = float(mask_utils.area(rle))
            elif _finite_number((ann.get("bbox") or [0, 0, 0, 0])[2]):
                area = float(ann["bbox"][2] * ann["bbox"][3])
        except (ValueError, TypeError, KeyError, IndexError):
            pass
        ann["area"] = area
        filled += 1
    return filled


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def image_file_name(img: dict) -> str:
    """Relative image path: ``file_name``, or for LVIS the path part of ``coco_url``."""
    if img.get("file_name"):
        return img["file_name"]
    url = img.get("coco_url", "")
    for prefix in LVIS_URL_PREFIXES:
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url.rsplit("/", 1)[-1]


def drop_unusable_images(data: dict, max_pixels: int | None = None, root: str | None = None) -> int:
    """Remove, in place, the image entries a downstream COCO tool (stage 2's mmdet loader) must
    not see, and the annotations on them: not an object, no integer id, a duplicate id, no valid
    size (or more than ``max_pixels``), a file name outside the images root (``root`` given:
    resolved as ``exits.data.images.image_uri`` does; else the name alone is checked).
    Returns how many image entries were removed."""
    from exits.data.images import ImageError, image_uri, relative_name

    def name_error(img: dict) -> str | None:
        name = image_file_name(img)
        try:
            ok = image_uri(root, name) if root else relative_name(name)
        except ImageError:
            ok = None
        return None if ok else "file name outside the images root"

    images = data.get("images") or []
    good, _ = check_images(images, max_pixels, name_error)
    keep = [i for i in images if isinstance(i, dict) and id_or_none(i.get("id")) in good]
    if len(keep) == len(images):
        return 0
    data["images"] = keep
    data["annotations"] = [
        a for a in data.get("annotations") or []
        if isinstance(a, dict) and id_or_none(a.get("image_id")) in good
    ]  # fmt: skip
    return len(images) - len(keep)
