"""exits.inference.masks_for_rows: crop -> logits -> paste-back lands on the right pixels.

A stub "generator" answers +10 where its crop is red and -10 elsewhere (at S/4 resolution), so
the pasted mask must be the red pixels of the image inside the instance box, nothing else.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exits.inference import masks_for_rows

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
