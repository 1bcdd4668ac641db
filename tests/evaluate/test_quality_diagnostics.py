"""exits.evaluate.quality (stage-1b held-out metric) and exits.evaluate.diagnostics (retrieval
precision / AUC): known answers on small inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from exits.config import RetrievalConfig
from exits.data.rle import encode
from exits.evaluate.diagnostics import _auc, retrieval_stats
from exits.evaluate.quality import evaluate_masks


def _table(masks: list[np.ndarray]) -> pa.Table:
    rows = []
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        rows.append({"ann_id": 10 + i, "image_id": 1 + i // 2, "category_id": 1,
                     "file_name": f"{1 + i // 2}.png", "height": m.shape[0], "width": m.shape[1],
                     "gt_segmentation": json.dumps(encode(m)), "area": float(m.sum()),
                     "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})  # fmt: skip
    return pa.Table.from_pylist(rows)


def test_evaluate_masks_known_iou():
    a = np.zeros((20, 20), bool)
    a[2:10, 2:10] = True  # 64 px
    b = np.zeros((20, 20), bool)
    b[10:18, 10:18] = True
    table = _table([a, b])
    half = a.copy()
    half[2:10, 6:10] = False  # 32 of the GT's 64 px: IoU 0.5
    rows = table.to_pylist()
    miou = evaluate_masks(table, [(rows[0], a.astype(np.float32)), (rows[1], half * 0.9)], 0.5)
    # instance 2 predicted as `half` (disjoint from b): IoU 0; instance 1 exact: IoU 1
    assert miou["all"] == {"miou": 0.5, "count": 2} and miou["missing"] == miou["extra"] == 0
    # a GT without a mask scores 0 (missing); a mask of a row without GT is extra
    no_gt = {**rows[1], "ann_id": 99, "gt_segmentation": None}
    table3 = pa.Table.from_pylist([*rows, no_gt])
    out = evaluate_masks(table3, [(rows[0], a.astype(np.float32)), (no_gt, a * 1.0)], 0.5)
    assert out["all"] == {"miou": 0.5, "count": 2} and (out["missing"], out["extra"]) == (1, 1)


def test_auc_rank_sum_with_ties():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert _auc(scores, np.array([False, False, True, True])) == pytest.approx(0.75)
    assert _auc(np.ones(4), np.array([False, True, False, True])) == pytest.approx(0.5)  # ties
    assert np.isnan(_auc(scores, np.zeros(4, bool)))
    # pairs (pos, neg), ties count 1/2: (.5,.5) ½, (.5,.1) 1, (.5,.9) 0, (.9,.5) 1, (.9,.1) 1,
    # (.9,.9) ½ -> 4 of 6
    s = np.array([0.5, 0.5, 0.1, 0.9, 0.9], np.float32)
    assert _auc(s, np.array([True, False, False, True, False])) == pytest.approx(4 / 6)
    assert _auc(s, np.array([False, True, True, False, True])) == pytest.approx(2 / 6)


def test_retrieval_stats_on_a_two_colour_crop():
    """Bilateral retrieval on a crop whose object is one colour and background another:
    what it retrieves is right, and the score separates object from background."""
    S, grid = 32, 8
    image = torch.full((1, 3, S, S), 40, dtype=torch.uint8)
    gt = torch.zeros(1, S, S, dtype=torch.bool)
    gt[:, 8:24, 8:24] = True
    image[:, :, 8:24, 8:24] = 220
    batch = {
        "image": image,
        "points": torch.tensor([[[15.0, 8.0], [8.0, 15.0], [15.0, 23.0], [23.0, 15.0]]]),
        "box": torch.tensor([[4.0, 4.0, 28.0, 28.0]]),  # a loose box: background inside it
        "valid": torch.ones(1, S, S, dtype=torch.bool),
        "has_points": torch.tensor([True]),
        "gt": gt,
    }
    rc = RetrievalConfig(similarity="bilateral", threshold_rule="relative")
    stats = retrieval_stats([batch], grid, rc)
    assert stats["auc"] > 0.9
    assert stats["fg_precision"] == pytest.approx(1.0) and stats["bg_precision"] == pytest.approx(
        1.0
    )
