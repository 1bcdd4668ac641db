"""COCO run-length encoding of binary masks: the one wrapper around ``pycocotools.mask``.

An RLE here is the json-able dict ``{"size": [h, w], "counts": str}`` (compressed counts as
ASCII text, column-major runs starting with zeros), the form stored in tables and COCO json.
Every function also accepts ``counts`` as bytes, as pycocotools and ``COCO.annToRLE`` return
them. Polygons and uncompressed RLE are converted by :func:`exits.data.coco.segmentation_to_rle`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

Rle = Mapping[str, Any]  # {"size": [h, w], "counts": str | bytes}


def _coded(rle: Rle) -> dict[str, Any]:
    """The dict pycocotools reads: size as a list, counts as bytes."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def encode(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool (or 0/1) mask -> ``{"size": [H, W], "counts": str}``."""
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: Rle) -> np.ndarray:
    """RLE -> (H, W) bool mask."""
    return mask_utils.decode(_coded(rle)).astype(bool)


def to_json(rle: Rle) -> str:
    """RLE -> json text ``{"size": [h, w], "counts": str}`` (bytes counts become text)."""
    coded = _coded(rle)
    return json.dumps({"size": coded["size"], "counts": coded["counts"].decode("ascii")})


def from_json(text: str) -> dict[str, Any]:
    """Json text of an RLE -> ``{"size": [h, w], "counts": str}``."""
    rle = json.loads(text)
    return {"size": [int(v) for v in rle["size"]], "counts": str(rle["counts"])}


def area(rle: Rle) -> int:
    """Foreground pixel count."""
    return int(mask_utils.area(_coded(rle)))


def bbox(rle: Rle) -> list[float]:
    """COCO box ``[x, y, w, h]`` in pixels of the foreground (all 0 when empty)."""
    return [float(v) for v in mask_utils.toBbox(_coded(rle))]


def iou(a: Rle, b: Rle) -> float:
    """IoU of two RLEs of the same size (non-crowd)."""
    return float(mask_utils.iou([_coded(a)], [_coded(b)], [0])[0, 0])
