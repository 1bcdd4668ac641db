"""exits.data.rle: known answers on hand-made 3×4 masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from exits.data import rle

# column-major runs starting with zeros: 000 | 110 | 110 | 000 -> 3, 2, 1, 2, 4
SQUARE = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
# compressed (pycocotools rleToString): from the 4th run on, the delta from the run two back
# (3, 2, 1, 2-2, 4-1); each small value x is one char, 48 + x
SQUARE_COUNTS = "32103"


def test_encode_known_counts():
    r = rle.encode(SQUARE)
    assert r == {"size": [3, 4], "counts": SQUARE_COUNTS}
    # the uncompressed runs behind it, through pycocotools' own reader
    unc = mask_utils.frPyObjects({"size": [3, 4], "counts": [3, 2, 1, 2, 4]}, 3, 4)
    assert unc["counts"].decode() == SQUARE_COUNTS


def test_round_trip_and_json():
    masks = [SQUARE, np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(3, 4, dtype=bool)]
    for m in masks:
        r = rle.encode(m)
        assert np.array_equal(rle.decode(r), m) and rle.decode(r).dtype == bool
        text = rle.to_json(r)
        assert json.loads(text)["counts"] == r["counts"]
        assert rle.from_json(text) == r
        assert np.array_equal(rle.decode(rle.from_json(text)), m)
    # 0/1 integers encode like bools; bytes counts (pycocotools' form) are accepted everywhere
    assert rle.encode(SQUARE.astype(np.uint8)) == rle.encode(SQUARE)
    coded = {"size": [3, 4], "counts": SQUARE_COUNTS.encode()}
    assert np.array_equal(rle.decode(coded), SQUARE)
    assert rle.from_json(rle.to_json(coded)) == {"size": [3, 4], "counts": SQUARE_COUNTS}
    with pytest.raises(ValueError, match="mask"):
        rle.encode(np.zeros((2, 3, 4), bool))


def test_area_bbox_iou_known_values():
    r = rle.encode(SQUARE)
    assert rle.area(r) == 4
    assert rle.bbox(r) == [1.0, 0.0, 2.0, 2.0]  # x, y, w, h
    assert rle.area(rle.encode(np.zeros((3, 4), bool))) == 0
    right = np.zeros((3, 4), bool)
    right[:2, 2:] = True  # shares column 2 with SQUARE: 2 of 6 pixels
    assert rle.iou(r, rle.encode(right)) == pytest.approx(2 / 6)
    assert rle.iou(r, r) == pytest.approx(1.0)
