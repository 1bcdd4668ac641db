"""The evaluator reads ``iscrowd`` by prepare's rule (exits.data.validate.crowd_flag): JSON
true/false or 0/1, absent = 0; anything else (the string "0" was taken as crowd) is an error
naming the annotation id, in the mIoU, in COCO AP and at the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from exits import evaluate as ev
from exits.evaluate.checks import gt_crowd
from exits.evaluate.metrics import main

H = W = 32


def square(x0: int, y0: int, side: int) -> dict:
    m = np.zeros((H, W), np.uint8)
    m[y0 : y0 + side, x0 : x0 + side] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": r["counts"].decode("ascii")}


def gt_json(crowd2) -> dict:
    """Two GT instances of one category on one image: id 1 a 4x4 square (not crowd), id 2 a
    6x6 square whose ``iscrowd`` is ``crowd2`` (key left out for ``...``)."""
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": square(2, 2, 4),
             "area": 16.0, "bbox": [2, 2, 4, 4], "iscrowd": False},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": square(20, 20, 6),
             "area": 36.0, "bbox": [20, 20, 6, 6]}]  # fmt: skip
    if crowd2 is not ...:
        anns[1]["iscrowd"] = crowd2
    return {"images": [{"id": 1, "file_name": "1.png", "height": H, "width": W}],
            "categories": [{"id": 1, "name": "a"}], "annotations": anns}  # fmt: skip


# id 1: the left half of its square (IoU 8 / 16); id 2: none (IoU 0 when not crowd)
LEFT_HALF = np.pad(np.ones((4, 2), np.uint8), ((2, H - 6), (2, W - 4)))  # rows 2-5, cols 2-3
PSEUDO = {"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "score": 1.0,
                           "segmentation": {"size": [H, W], "counts": mask_utils.encode(
                               np.asfortranarray(LEFT_HALF))["counts"].decode("ascii")}}]}  # fmt: skip


@pytest.mark.parametrize(
    "value, crowd", [(True, True), (False, False), (1, True), (0, False), (1.0, True), (0.0, False)]
)
def test_valid_values(value, crowd):
    assert gt_crowd({"id": 5, "iscrowd": value}) is crowd
    assert gt_crowd({"id": 5}) is False  # absent: not crowd


@pytest.mark.parametrize("value", ["0", "1", "true", None, 2, -1, 0.5, [0], {}])
def test_invalid_values_name_the_annotation(value):
    with pytest.raises(
        ValueError, match=r"^GT annotation id '7': iscrowd must be a boolean or 0/1"
    ):
        gt_crowd({"id": 7, "iscrowd": value})


@pytest.mark.parametrize("crowd2, miou, count, missing", [
    (True, 0.5, 1, 0), (1, 0.5, 1, 0),        # id 2 skipped: mean of {0.5}
    (False, 0.25, 2, 1), (0, 0.25, 2, 1), (..., 0.25, 2, 1),  # id 2 scored 0: mean of {0.5, 0}
])  # fmt: skip
def test_miou_known_answers(crowd2, miou, count, missing):
    out = ev.pseudo_label_miou(gt_json(crowd2), PSEUDO)
    assert out["all"] == {"miou": pytest.approx(miou, abs=1e-12), "count": count}
    assert out["missing"] == missing


def test_string_zero_is_an_error_not_a_crowd():
    """Issue 26 item 8: ``"0"`` is truthy in Python; it was skipped as crowd (mIoU 0.5, AP 1)."""
    with pytest.raises(ValueError, match=r"GT annotation id '2': iscrowd must be .* got '0' "):
        ev.pseudo_label_miou(gt_json("0"), PSEUDO)
    with pytest.raises(ValueError, match=r"GT annotation id '2': iscrowd must be"):
        ev.mask_ap(gt_json("0"), PSEUDO, iou_types=("segm",))


@pytest.mark.parametrize("crowd2, ap", [(True, 1.0), (False, 51 / 101), (..., 51 / 101)])
def test_mask_ap_known_answers(crowd2, ap):
    """One detection, exactly GT id 1: a crowd id 2 is ignored (AP 1); otherwise recall stops at
    1/2 with precision 1, so 51 of COCOeval's 101 recall points have precision 1: AP 51/101
    (absent ``iscrowd`` is 0, not a KeyError inside pycocotools)."""
    det = [{"image_id": 1, "category_id": 1, "score": 1.0, "segmentation": square(2, 2, 4)}]
    out = ev.mask_ap(gt_json(crowd2), det, iou_types=("segm",))
    assert out["segm"]["AP"] == pytest.approx(ap, abs=1e-9)
    gt = gt_json(crowd2)
    ev.mask_ap(gt, det, iou_types=("segm",))
    assert gt == gt_json(crowd2)  # the caller's json is not modified


def test_command_line_one_line_error(tmp_path):
    gt, pred = tmp_path / "gt.json", tmp_path / "pred.json"
    gt.write_text(json.dumps(gt_json("0")))
    pred.write_text(json.dumps(PSEUDO))
    with pytest.raises(SystemExit, match=r"^exits.evaluate: GT annotation id '2': iscrowd must"):
        main(["--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "out")])
