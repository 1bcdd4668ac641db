"""exits.data.visualize: the expected colours land on the mask pixels."""

from __future__ import annotations

import json

import cv2
import numpy as np

from exits.data import rle
from exits.data.visualize import COLOURS, draw_instances, loss_curve_png, overlay_dataset

WHITE = [255, 255, 255]


def _square(h: int, w: int, y0: int, x0: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_draw_instances_colours_fill_contour_and_points():
    image = np.zeros((20, 30, 3), np.uint8)
    a, b = _square(20, 30, 2, 2, 5), _square(20, 30, 10, 15, 6)
    out = draw_instances(image, [a, b], points=[np.array([[25, 3]] * 4)], alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    c0, c1 = COLOURS[0], COLOURS[1]
    # interior: half the colour over black (truncated to uint8); the one-pixel outline: the colour
    assert out[4, 4].tolist() == (c0 * 0.5).astype(np.uint8).tolist()
    assert out[2, 4].tolist() == c0.astype(np.uint8).tolist()  # top edge of mask a
    assert out[12, 17].tolist() == (c1 * 0.5).astype(np.uint8).tolist()
    assert out[10, 15].tolist() == c1.astype(np.uint8).tolist()  # corner of mask b
    # a point: white disc of radius 2 with the instance colour on its rim
    assert out[3, 25].tolist() == WHITE
    # elsewhere the image is untouched
    untouched = ~(a | b)
    untouched[0:7, 22:29] = False  # around the point
    assert out[untouched].max() == 0
    assert image.max() == 0  # the input is not drawn on


def test_overlay_dataset_decodes_polygons_and_rle(tmp_path):
    h, w = 24, 32
    image = np.full((h, w, 3), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    poly = [[2.0, 2.0, 14.0, 2.0, 14.0, 14.0, 2.0, 14.0]]  # pixels 2..13 (COCO polygon fill)
    square = _square(h, w, 8, 18, 12)  # RLE instance, pixels y 8..19, x 18..29
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": poly},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rle.encode(square)},
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    out = tmp_path / "grid.png"
    overlay_dataset(str(tmp_path / "ann.json"), str(tmp_path), str(out), n=1, scale=1)
    grid = cv2.imread(str(out))[..., ::-1]  # RGB
    assert grid.shape == (h, 4 * (w + 2), 3)  # one tile (+2 px gap) and three empty slots
    blend = lambda c: (100 * 0.5 + c * 0.5).astype(np.uint8).tolist()  # noqa: E731
    assert grid[7, 7].tolist() == blend(COLOURS[0])  # polygon interior
    assert grid[14, 24].tolist() == blend(COLOURS[1])  # RLE interior
    assert grid[20, 5].tolist() == [100, 100, 100]  # background
    assert grid[:, w + 2 :].max() == 0  # the empty slots


def test_loss_curve_png_is_a_png():
    data = loss_curve_png([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (350, 600, 3)  # figsize (6, 3.5) at 100 dpi
