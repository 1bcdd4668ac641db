"""exits.inference.masks_for_rows: crop -> logits -> paste-back lands on the right pixels.

A stub "generator" answers +10 where its crop is red and -10 elsewhere (at S/4 resolution), so
the pasted mask must be the red pixels of the image inside the instance box, nothing else.
The quality score's terms (``box_margin``, ``click_agreement``, ``mask_score``) are checked
against hand-computed values.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exits.inference import (
    box_margin,
    box_pixels,
    click_agreement,
    expected_iou,
    mask_confidence,
    mask_fill,
    mask_from_logits,
    mask_parts,
    mask_reach,
    mask_score,
    masks_for_rows,
    score_candidates,
)

S = 32  # crop side; the stub's logits are (S/4)²
H, W = 48, 64
GRAY, RED = (128, 128, 128), (255, 0, 0)


class RedLogits(nn.Module):
    """(B, 3, S, S) ImageNet-normalised crops -> (B, 1, S/4, S/4) logits: ±10 by redness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        redness = F.avg_pool2d(x[:, :1] - x[:, 1:2], 4)  # (B, 1, S/4, S/4); R − G > 0 on red
        return torch.where(redness > 0, 10.0, -10.0)


def _write(path, image: np.ndarray) -> None:
    cv2.imwrite(str(path), image[..., ::-1])  # RGB -> BGR


def _row(ann_id: int, file_name: str, bbox: list[float]) -> dict:
    return {"ann_id": ann_id, "file_name": file_name, "height": H, "width": W, "bbox": bbox,
            "extreme_points": None}  # fmt: skip


def test_masks_land_on_the_red_pixels_inside_the_box(tmp_path):
    half = np.full((H, W, 3), GRAY, np.uint8)
    half[16:32, 24:40] = RED  # the right half of the box below
    _write(tmp_path / "half.png", half)
    _write(tmp_path / "red.png", np.full((H, W, 3), RED, np.uint8))
    rows = [
        _row(1, "half.png", [8, 16, 32, 16]),  # box x 8..40, y 16..32
        _row(2, "red.png", [40, 4, 20, 30]),  # box x 40..60, y 4..34; red everywhere
        _row(3, "half.png", [8, 16, 32, 16]),  # back to the first image, another batch
    ]
    out = list(masks_for_rows(RedLogits(), rows, str(tmp_path), S, batch_size=2))
    assert [r["ann_id"] for r, _ in out] == [1, 2, 1 + 2]
    for _, prob in out:
        assert prob.shape == (H, W) and prob.dtype == np.float32

    want = np.zeros((H, W), bool)
    want[16:32, 24:40] = True
    np.testing.assert_array_equal(out[0][1] >= 0.5, want)
    np.testing.assert_array_equal(out[2][1], out[0][1])
    assert out[0][1][:16].max() == 0 and out[0][1][:, :8].max() == 0  # zero outside the box

    # all red: the sigmoid of +10 on exactly the box pixels, 0 elsewhere (enlarged crop or not)
    box = np.zeros((H, W), bool)
    box[4:34, 40:60] = True
    p = out[1][1]
    np.testing.assert_allclose(p[box], 1 / (1 + np.exp(-10.0)), rtol=1e-6)
    assert p[~box].max() == 0


@pytest.mark.parametrize("enlarge", [1.0, 1.5])
def test_enlargement_changes_the_crop_not_the_answer(tmp_path, enlarge):
    img = np.full((H, W, 3), GRAY, np.uint8)
    img[16:32, 24:40] = RED
    _write(tmp_path / "half.png", img)
    ((_, prob),) = masks_for_rows(
        RedLogits(), [_row(1, "half.png", [8, 16, 32, 16])], str(tmp_path), S, enlarge=enlarge
    )
    want = np.zeros((H, W), bool)
    want[16:32, 24:40] = True
    np.testing.assert_array_equal(prob >= 0.5, want)


# ----------------------------------------------------------------------------- quality score
CLICKS = np.array([[4, 0], [0, 5], [6, 9], [9, 3]], float)  # top, left, bottom, right (x, y)


def test_box_margin_hand_computed():
    # |2p - 1| = 1, 1, 0, 0.5 -> mean 0.625
    assert box_margin(np.array([[0.0, 1.0], [0.5, 0.75]])) == pytest.approx(0.625)
    assert box_margin(np.full((3, 4), 0.5)) == 0.0
    assert box_margin(np.zeros((0, 0))) == 0.0


def test_click_agreement_is_one_when_the_mask_meets_its_clicks():
    mask = np.ones((10, 10), bool)  # covers every click, extremes on the clicks' rows/cols
    assert click_agreement(mask, CLICKS) == 1.0
    assert click_agreement(np.zeros((10, 10), bool), CLICKS) == 0.0


def test_click_agreement_hand_computed():
    mask = np.ones((10, 10), bool)
    mask[:3] = False  # the mask stops 3 rows below the top click (4, 0)
    # top: inside 0 (no mask pixel within 1 px), extreme 1 - 3/10 = 0.7 -> (0 + 0.7) / 2 = 0.35;
    # left (0, 5), bottom (6, 9), right (9, 3): inside and at their extremes -> 1 each
    assert click_agreement(mask, CLICKS) == pytest.approx((0.35 + 3) / 4)
    mask[:1] = True  # back up to row 0, but not at column 4 (a hole around the click)
    mask[0:2, 3:6] = False
    # top: inside 0, extreme 1 (the first row is 0) -> 0.5; the others still 1
    assert click_agreement(mask, CLICKS) == pytest.approx((0.5 + 3) / 4)
    # a mask pixel one pixel away (diagonal) counts as inside with the default tolerance 1
    mask[1, 5] = True
    assert click_agreement(mask, CLICKS) == 1.0
    assert click_agreement(mask, CLICKS, tolerance=0) == pytest.approx((0.5 + 3) / 4)


def test_score_candidates_hand_computed_and_box_rows_use_side_midpoints():
    prob = np.where(np.arange(10)[:, None] >= 3, 1.0, 0.25) * np.ones((1, 10))  # (10, 10)
    prob[9, 9] = 0.6
    mask = prob >= 0.5  # rows 3..9
    margin = (30 * 0.5 + 69 * 1.0 + 0.2) / 100  # |2p - 1|: 0.5 on 30 px, 1 on 69, 0.2 on 1
    confidence = (69 * 1.0 + 0.6) / 70  # mean p over the 70 mask pixels
    # expected IoU: sum(p m) = 69.6, sum(m) = 70, sum(p) = 69.6 + 30 * 0.25 = 77.1
    soft = 69.6 / (70 + 77.1 - 69.6)
    got = score_candidates(prob, mask, CLICKS)
    assert got == pytest.approx({"expected_iou": soft, "confidence": confidence, "margin": margin,
                                 "click": 3.35 / 4, "click_x_margin": 3.35 / 4 * margin,
                                 "fill": 0.7, "parts": 1.0, "reach": 0.7})  # fmt: skip
    assert mask_score(prob, mask, CLICKS) == pytest.approx(soft)  # the shipped score
    assert mask_confidence(prob, np.zeros_like(mask)) == 0.0
    assert expected_iou(prob, np.zeros_like(mask)) == 0.0
    # a crisp 0/1 map scores 1: the mask is exactly the probabilities
    assert expected_iou(mask.astype(float), mask) == 1.0
    # box-only: the side midpoints (4.5, 0), (0, 4.5), (4.5, 9), (9, 4.5) are the clicks; the
    # top one is missed exactly as CLICKS' top is
    assert score_candidates(prob, mask, None)["click"] == pytest.approx(3.35 / 4)
    assert score_candidates(prob, mask, np.full((4, 2), np.nan)) == score_candidates(
        prob, mask, None
    )


def test_mask_fill_parts_and_reach_hand_computed():
    mask = np.zeros((4, 5), bool)
    mask[0, 0:2] = True  # piece 1: 2 px
    mask[2:4, 3] = True  # piece 2: 2 px, not touching piece 1
    mask[3, 0] = True  # piece 3: 1 px
    assert mask_fill(mask) == pytest.approx(5 / 20)
    assert mask_parts(mask) == pytest.approx(1 / 3)
    assert mask_reach(mask) == pytest.approx(4 * 4 / 20)  # rows 0-3, columns 0-3 of 4 x 5
    mask[1, 2] = True  # touches piece 1 diagonally (1, 2)-(0, 1) and piece 2 (2, 3): one piece
    assert mask_parts(mask) == pytest.approx(1 / 2)
    assert mask_parts(np.zeros((3, 3), bool)) == 0.0
    assert mask_fill(np.zeros((0, 0), bool)) == 0.0
    assert mask_reach(np.zeros((3, 3), bool)) == 0.0
    mask[:, 4] = True  # now touches all four sides
    assert mask_reach(mask) == 1.0


def test_box_pixels_follow_the_pixel_centre_rule():
    rows, cols = box_pixels(np.array([2.0, 3.0, 7.0, 5.0]), (10, 10))
    assert (rows, cols) == (slice(3, 5), slice(2, 7))
    rows, cols = box_pixels(np.array([1.6, -2.0, 12.0, 4.4]), (10, 10))  # centres 2.5.., clipped
    assert (rows, cols) == (slice(0, 4), slice(2, 10))


def test_mask_from_logits_scores_in_image_coordinates():
    logits = np.full((24, 24), 5.0, np.float32)  # the whole box is foreground
    box = np.array([20.0, 30.0, 50.0, 60.0])
    crop_box = np.array([15.5, 25.5, 54.5, 64.5])
    points = np.array([[33, 30], [20, 41], [37, 59], [49, 50]], float)  # on the box's edges
    mask, score = mask_from_logits(logits, box, crop_box, (96, 96), 0.5, points=points)
    assert mask.sum() == 30 * 30
    # expected IoU: p = sigmoid(5) on every box pixel, all in the mask -> sum(p) / n = sigmoid(5)
    assert score == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-5)
    full = np.zeros((96, 96), np.float32)
    full[30:60, 20:50] = 1 / (1 + np.exp(-5.0))
    got = score_candidates(full[30:60, 20:50], mask[30:60, 20:50], points - [20, 30])
    # clicks all met (1) x margin |2 sigmoid(5) - 1| = tanh(2.5): the points land in box frame
    assert got["click_x_margin"] == pytest.approx(np.tanh(2.5), rel=1e-5)
