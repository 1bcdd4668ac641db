"""Known answers for exits.evaluate (mask AP, retention, pseudo-label mIoU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from exits import evaluate as ev

H = W = 64


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def square(x0: int, y0: int, side: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0 : y0 + side, x0 : x0 + side] = 1
    return m


def two_blobs() -> np.ndarray:
    """Two 6×6 squares 10 px apart: 2 connected components."""
    return square(5, 5, 6) | square(21, 5, 6)


def ann(
    ann_id: int, image_id: int, mask: np.ndarray, cat: int = 1, score: float | None = None
) -> dict:
    r = rle(mask)
    out = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": r,
        "area": float(mask_utils.area(r)),
        "bbox": mask_utils.toBbox(r).tolist(),
        "iscrowd": 0,
    }
    if score is not None:
        out["score"] = score
    return out


def coco(anns: list[dict]) -> dict:
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": anns,
    }


@pytest.fixture
def gt() -> dict:
    polygon = {  # a polygon GT (20×20 square) next to RLE ones
        "id": 3,
        "image_id": 2,
        "category_id": 2,
        "segmentation": [[30, 30, 50, 30, 50, 50, 30, 50]],
        "area": 400.0,
        "bbox": [30, 30, 20, 20],
        "iscrowd": 0,
    }
    return coco([ann(1, 1, square(10, 10, 10)), ann(2, 1, two_blobs(), cat=2), polygon])


def test_gt_against_itself_gives_ap_and_miou_one(gt: dict) -> None:
    ap = ev.mask_ap(gt, gt)
    assert ap["segm"]["AP"] == pytest.approx(1.0)
    assert ap["bbox"]["AP"] == pytest.approx(1.0)
    miou = ev.pseudo_label_miou(gt, gt)
    assert miou["all"] == {"miou": pytest.approx(1.0), "count": 3}
    assert miou["missing"] == 0 and miou["extra"] == 0


def test_shifted_square_gives_hand_computed_iou() -> None:
    # 10×10 square shifted 2 px right: intersection 8×10 = 80, union 120
    gt = coco([ann(1, 1, square(10, 10, 10))])
    pseudo = coco([ann(1, 1, square(12, 10, 10), score=1.0)])
    expected = 80 / 120
    assert ev.rle_iou(
        pseudo["annotations"][0]["segmentation"], gt["annotations"][0]["segmentation"]
    ) == pytest.approx(expected)
    miou = ev.pseudo_label_miou(gt, pseudo)
    assert miou["all"]["miou"] == pytest.approx(expected)
    assert miou["small"] == {"miou": pytest.approx(expected), "count": 1}  # area 100 < 32²
    assert miou["medium"]["count"] == 0 and math.isnan(miou["medium"]["miou"])
    # IoU 0.667 is a hit at thresholds 0.50-0.65 (4 of 10) and a miss above
    assert ev.mask_ap(gt, pseudo)["segm"]["AP"] == pytest.approx(0.4)


def test_separated_subset_selection() -> None:
    assert ev.num_components(two_blobs()) == 2 and ev.is_separated(two_blobs())
    assert not ev.is_separated(square(0, 0, 5))
    diagonal = np.zeros((8, 8), np.uint8)
    diagonal[2, 2] = diagonal[3, 3] = 1  # touching at a corner: one component at 8-connectivity
    assert ev.num_components(diagonal) == 1 and not ev.is_separated(diagonal)

    gt = coco([ann(1, 1, square(10, 10, 10)), ann(2, 1, two_blobs())])
    # pseudo keeps only the left blob: IoU 36 / 72 on the separated instance
    pseudo = coco([ann(1, 1, square(10, 10, 10)), ann(2, 1, square(5, 5, 6))])
    miou = ev.pseudo_label_miou(gt, pseudo)
    assert miou["separated"] == {"miou": pytest.approx(0.5), "count": 1}
    assert miou["all"]["miou"] == pytest.approx(0.75)


def test_missing_pseudo_label_scores_zero(gt: dict) -> None:
    pseudo = dict(gt, annotations=[a for a in gt["annotations"] if a["id"] != 2])
    pseudo["annotations"] = pseudo["annotations"] + [ann(99, 1, square(0, 0, 4))]
    miou = ev.pseudo_label_miou(gt, pseudo)
    assert miou["missing"] == 1 and miou["extra"] == 1
    assert miou["all"]["miou"] == pytest.approx(2 / 3)


def test_size_buckets_use_coco_thresholds() -> None:
    assert ev.size_bucket(32**2 - 1) == "small"
    assert ev.size_bucket(32**2) == "medium"
    assert ev.size_bucket(96**2) == "large"


def test_retention() -> None:
    assert ev.retention(0.27, 0.3) == pytest.approx(0.9)
    assert math.isnan(ev.retention(0.1, 0.0))


def test_no_detections_gives_zero_ap(gt: dict) -> None:
    assert ev.mask_ap(gt, [])["segm"]["AP"] == 0.0


def test_cli_writes_metrics(gt: dict, tmp_path) -> None:
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    out = tmp_path / "out"
    metrics = ev.main(
        ["--gt", str(gt_path), "--pred", str(gt_path), "--pred-gt-trained", str(gt_path),
         "--pseudo", str(gt_path), "--out", str(out)]
    )  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["retention"]["segm"] == pytest.approx(1.0)
    assert saved["pseudo_label_miou"]["all"]["miou"] == pytest.approx(1.0)
    assert metrics["metric"] == "coco"
    table = (out / "metrics.md").read_text()
    assert "| separated |" in table and "Retention" in table


def lvis(anns: list[dict], neg: dict[int, list[int]]) -> dict:
    """LVIS v1 json: 3 images, cat 1 frequent, cat 2 rare; ``neg`` = verified-absent cats."""
    return {
        "images": [
            {
                "id": i,
                "file_name": f"{i}.png",
                "height": H,
                "width": W,
                "neg_category_ids": neg.get(i, []),
                "not_exhaustive_category_ids": [],
            }
            for i in (1, 2, 3)
        ],  # fmt: skip
        "categories": [
            {"id": 1, "name": "a", "frequency": "f"},
            {"id": 2, "name": "b", "frequency": "r"},
        ],
        "annotations": anns,
    }


def test_lvis_federated_ap_known_answers() -> None:
    # image 1: an 'a'; image 2: a 'b'; image 3: an 'a'. Category 'b' is verified absent on
    # image 1 (neg_category_ids) and unverified on image 3.
    gt = lvis(
        [ann(1, 1, square(10, 10, 10)), ann(2, 2, square(20, 20, 12), cat=2),
         ann(3, 3, square(5, 5, 16))],
        neg={1: [2]},
    )  # fmt: skip
    assert ev.is_lvis(gt)
    self_ap = ev.lvis_ap(gt, gt, iou_types=("segm",))
    assert self_ap["evaluator"] == "lvis" and self_ap["segm"]["AP"] == pytest.approx(1.0)

    tp_b = ann(10, 2, square(20, 20, 12), cat=2, score=0.5)
    truths = [ann(11, 1, square(10, 10, 10), score=1.0), ann(12, 3, square(5, 5, 16), score=1.0)]
    # a higher-scored 'b' where 'b' is verified absent: false positive ranked first, so
    # category 'b' has precision 1/2 at every recall -> AP_b 0.5, mean (1 + 0.5) / 2
    fp_on_negative = ann(13, 1, square(40, 40, 10), cat=2, score=0.9)
    res = ev.lvis_ap(gt, truths + [tp_b, fp_on_negative], iou_types=("segm",))["segm"]
    assert res["AP"] == pytest.approx(0.75) and res["APr"] == pytest.approx(0.5)
    assert res["APf"] == pytest.approx(1.0)
    # the same detection on image 3 (where 'b' is unverified) is ignored by LVIS ...
    ignored = ann(13, 3, square(40, 40, 10), cat=2, score=0.9)
    assert ev.lvis_ap(gt, truths + [tp_b, ignored], iou_types=("segm",))["segm"][
        "AP"
    ] == pytest.approx(1.0)
    # ... but counted as a false positive by COCOeval
    assert ev.mask_ap(gt, truths + [tp_b, ignored], iou_types=("segm",))["segm"][
        "AP"
    ] == pytest.approx(0.75)


def test_mmdet_metrics_table_nests_keys_and_fills_missing_with_zero():
    flat = {"coco/segm_mAP": 0.3, "coco/segm_mAP_50": 0.5, "coco/bbox_mAP": 0.4, "iter": 7}
    table = ev.mmdet_metrics_table(flat)
    assert table["segm"]["mAP"] == 0.3 and table["segm"]["mAP_50"] == 0.5
    assert table["segm"]["mAP_l"] == 0.0  # mmdet found nothing there: 0
    assert table["bbox"]["mAP"] == 0.4 and set(table) == {"segm", "bbox"}


def _row(ann_id: int, image_id: int, bbox: list[float], points=None) -> dict:
    """An instance-table row (only the fields the box baseline reads)."""
    return {"ann_id": ann_id, "image_id": image_id, "category_id": 1, "height": H, "width": W,
            "bbox": bbox, "extreme_points": points}  # fmt: skip


def test_box_baseline_known_answers() -> None:
    full = square(10, 10, 20)  # GT equal to its box -> IoU 1
    half = np.zeros((H, W), np.uint8)
    half[40:60, 30:40] = 1  # GT = left half of the 20x20 box [30, 40, 50, 60] -> IoU 0.5
    gt = coco([ann(1, 1, full), ann(2, 2, half)])
    rows = [
        _row(1, 1, [0, 0, 1, 1], points=[[15, 10], [10, 15], [15, 29], [29, 15]]),  # points win
        _row(2, 2, [30, 40, 20, 20]),  # box-only row: the COCO xywh bbox
    ]
    m = ev.box_baseline_miou(gt, rows)
    assert m["all"]["count"] == 2 and m["missing"] == 0 and m["extra"] == 0
    assert m["all"]["miou"] == pytest.approx(0.75)
    one = ev.box_baseline_miou(coco([ann(1, 1, full)]), rows[:1])
    assert one["all"]["miou"] == pytest.approx(1.0)
    half_only = ev.box_baseline_miou(coco([ann(2, 2, half)]), rows[1:])
    assert half_only["all"]["miou"] == pytest.approx(0.5)


def test_box_baseline_row_without_valid_box_is_missing() -> None:
    gt = coco([ann(1, 1, square(10, 10, 20))])
    m = ev.box_baseline_miou(gt, [_row(1, 1, [10, 10, 0, 0])])  # degenerate bbox, no points
    assert m["missing"] == 1 and m["all"]["miou"] == 0.0


def test_markdown_report_puts_the_box_baseline_beside_the_miou(gt: dict) -> None:
    m = ev.evaluate(gt, pseudo_json=gt)
    m["pseudo_label_miou_box"] = {**m["pseudo_label_miou"], "all": {"miou": 0.4321, "count": 3}}
    md = ev.markdown_report(m)
    assert "box-as-mask mIoU" in md
    assert "| all | 1.0000 | 0.4321 | 3 |" in md
