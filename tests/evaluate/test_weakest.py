"""exits.evaluate.weakest: the k lowest-score masks and the score histogram, streamed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from exits.data import rle
from exits.data.coco import write_table
from exits.evaluate import weakest
from exits.label.plan import MASK_SCHEMA


def test_lowest_scores_hand_computed():
    batches = [
        (np.array([5, 3, 9]), np.array([0.5, 0.1, 0.9])),
        (np.array([1, 2, 4]), np.array([0.1, np.nan, 1.0])),
    ]
    low, hist, no_score = weakest.lowest_scores(iter(batches), k=3, bins=4)
    # ties broken by ann_id; the NaN row is in neither the heap nor the histogram
    assert low == [(0.1, 1), (0.1, 3), (0.5, 5)]
    # bins [0, .25) [.25, .5) [.5, .75) [.75, 1]: 0.1, 0.1 | - | 0.5 | 0.9, 1.0
    assert hist.tolist() == [2, 0, 1, 2] and no_score == 1


def test_lowest_scores_equal_a_full_sort_over_many_batches():
    rng = np.random.default_rng(0)
    ids, scores = rng.permutation(1000), rng.random(1000).round(2)  # many ties
    batches = [(ids[k : k + 37], scores[k : k + 37]) for k in range(0, 1000, 37)]
    low, hist, _ = weakest.lowest_scores(batches, k=24, bins=20)
    assert low == sorted(zip(scores.tolist(), ids.tolist()))[:24]
    assert hist.tolist() == np.histogram(scores, bins=20, range=(0, 1))[0].tolist()
    assert weakest.lowest_scores(batches, k=0)[0] == []


def _rle(mask: np.ndarray) -> str:
    return rle.to_json(rle.encode(mask))


def test_weakest_masks_reads_k_rows_and_scores_them_against_gt(tmp_path):
    h, w = 20, 30
    gt = np.zeros((h, w), bool)
    gt[5:15, 5:25] = True  # 200 px
    half = gt.copy()
    half[:, 15:] = False  # 100 px inside the GT: IoU 0.5
    masks = [
        {"ann_id": a, "image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 10.0],
         "score": s, "segmentation": _rle(m), "area": float(m.sum()), "generator": "g",
         "supervision": "extreme_points"}
        for a, s, m in [(1, 0.9, gt), (2, 0.2, half), (3, 0.4, gt), (4, 0.3, half)]
    ]  # fmt: skip
    for k, part in enumerate((masks[:2], masks[2:])):
        write_table(pa.Table.from_pylist(part, schema=MASK_SCHEMA),
                    str(tmp_path / "masks" / f"shard-{k:05d}.parquet"))  # fmt: skip
    pts = [[10, 5], [5, 9], [12, 14], [24, 8]]
    inst = pa.Table.from_pylist(
        [{"ann_id": a, "file_name": "x.png", "height": h, "width": w, "bbox": [5.0, 5.0, 20.0, 10.0],
          "extreme_points": pts, "gt_segmentation": _rle(gt) if a != 4 else None}
         for a in (1, 2, 3, 4)]
    )  # fmt: skip
    write_table(inst, str(tmp_path / "instances.parquet"))
    out = weakest.weakest_masks(str(tmp_path / "masks"), str(tmp_path / "instances.parquet"),
                                k=3, bins=5)  # fmt: skip
    assert [e["ann_id"] for e in out["weakest"]] == [2, 4, 3]
    assert [e["score"] for e in out["weakest"]] == [0.2, 0.3, 0.4]
    assert out["weakest"][0]["iou"] == pytest.approx(0.5)
    assert out["weakest"][1]["iou"] is None  # no GT mask for instance 4
    assert out["weakest"][2]["iou"] == pytest.approx(1.0)
    assert out["weakest"][0]["box"] == [5.0, 5.0, 25.0, 15.0]  # from the extreme points
    assert out["weakest"][0]["extreme_points"] == pts
    # bins [0, .2) [.2, .4) [.4, .6) [.6, .8) [.8, 1]: - | 0.2, 0.3 | 0.4 | - | 0.9
    assert out["count"] == 4 and out["histogram"] == [0, 2, 1, 0, 1]
    assert out["bins"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    json.dumps(out)  # what eval writes
    with pytest.raises(FileNotFoundError, match="label has not run"):
        weakest.weakest_masks(str(tmp_path / "nothing"))


def test_score_ranking_hand_computed():
    scores, ious = [0.9, 0.1, 0.5, 0.7], [0.8, 0.2, 0.6, 0.4]
    # ranks 4 1 2 3 vs 4 1 3 2: sum d^2 = 2 -> rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    out = weakest.score_ranking(np.array(scores), np.array(ious), fractions=(0.9, 0.75, 0.5))
    assert out["spearman"] == pytest.approx(0.8)
    assert out["miou_all"] == pytest.approx(0.5)
    assert out["miou_top90"] == pytest.approx(0.5)  # ceil(3.6) = 4: all of them
    assert out["miou_top75"] == pytest.approx((0.8 + 0.4 + 0.6) / 3)
    assert out["miou_top50"] == pytest.approx((0.8 + 0.4) / 2)
    assert weakest.top_fraction_miou(np.array([0.5, 0.5]), np.array([1.0, 0.0]), 0.5) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        weakest.top_fraction_miou(np.array(scores), np.array(ious), 0.0)
