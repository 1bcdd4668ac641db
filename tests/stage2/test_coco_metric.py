"""Known answers for the stage-2 evaluator: mmdet's CocoMetric (the segm AP stage 2 reports)
on hand-made predictions, next to ``exits.evaluate.mask_ap`` on the same predictions.

The training tests in ``test_stage2.py`` are smoke tests: a few iterations from scratch may
predict nothing (AP 0), so they cannot show that the AP is right; these can.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from exits import evaluate

H = W = 64
SIDE = 20  # GT squares of 20x20 = 400 px (COCO "small")
PARTIAL = 250  # pixels kept of each square: IoU 250 / 400 = 0.625


def _square(x0: int, y0: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0 : y0 + SIDE, x0 : x0 + SIDE] = 1
    return m


def _partial(mask: np.ndarray) -> np.ndarray:
    """The first PARTIAL foreground pixels in raster order (12 full rows + 10 px)."""
    flat = mask.flatten().copy()
    flat[np.flatnonzero(flat)[PARTIAL:]] = 0
    return flat.reshape(mask.shape)


@pytest.fixture(scope="module")
def gt(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, dict[int, list[tuple[int, np.ndarray]]]]:
    """A GT json (2 images, 2 categories, 3 squares) and per image [(category, mask)]."""
    layout = {1: [(1, _square(5, 5)), (2, _square(35, 30))], 2: [(1, _square(20, 10))]}
    anns = []
    for image_id, objs in layout.items():
        for cat, m in objs:
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": rle, "area": float(m.sum()),
                         "bbox": mask_utils.toBbox(rle).tolist()})  # fmt: skip
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in layout],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": anns,
    }
    path = tmp_path_factory.mktemp("metric") / "gt.json"
    path.write_text(json.dumps(data))
    return str(path), layout


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _mmdet_ap(ann_file: str, layout: dict, masks_of) -> dict:
    """CocoMetric as stage 2 configures it (bbox + segm), fed one data sample per image; the
    boxes are the GT boxes, the masks ``masks_of(gt mask)``, scores 1."""
    metric_mod = pytest.importorskip("mmdet.evaluation")
    metric = metric_mod.CocoMetric(ann_file=ann_file, metric=["bbox", "segm"], format_only=False)
    metric.dataset_meta = {"classes": ("a", "b")}
    for image_id, objs in layout.items():
        sample = {"img_id": image_id, "ori_shape": (H, W), "pred_instances": {
            "bboxes": torch.tensor([_box(m) for _, m in objs], dtype=torch.float32),
            "scores": torch.ones(len(objs)),
            "labels": torch.tensor([cat - 1 for cat, _ in objs]),
            "masks": torch.from_numpy(np.stack([masks_of(m) for _, m in objs]).astype(bool)),
        }}  # fmt: skip
        metric.process({}, [sample])
    return dict(metric.compute_metrics(metric.results))


def _results(layout: dict, masks_of) -> list[dict]:
    out = []
    for image_id, objs in layout.items():
        for cat, m in objs:
            rle = mask_utils.encode(np.asfortranarray(masks_of(m).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            out.append(
                {"image_id": image_id, "category_id": cat, "segmentation": rle, "score": 1.0}
            )
    return out


def test_gt_masks_as_predictions_give_segm_ap_one(gt) -> None:
    ann_file, layout = gt
    m = _mmdet_ap(ann_file, layout, lambda g: g)
    assert m["segm_mAP"] == pytest.approx(1.0) and m["segm_mAP_50"] == pytest.approx(1.0)
    assert m["bbox_mAP"] == pytest.approx(1.0)
    ours = evaluate.mask_ap(ann_file, _results(layout, lambda g: g), iou_types=("segm",))
    assert ours["segm"]["AP"] == pytest.approx(1.0)


def test_partial_masks_give_the_known_lower_ap(gt) -> None:
    """IoU 0.625 passes the COCO thresholds 0.50, 0.55, 0.60 of ten: AP = 0.3, AP50 = 1, AP75 = 0."""
    ann_file, layout = gt
    m = _mmdet_ap(ann_file, layout, _partial)
    assert m["segm_mAP"] == pytest.approx(0.3, abs=1e-3)
    assert m["segm_mAP_50"] == pytest.approx(1.0) and m["segm_mAP_75"] == pytest.approx(0.0)
    assert m["bbox_mAP"] == pytest.approx(1.0)  # the boxes are the GT boxes
    ours = evaluate.mask_ap(ann_file, _results(layout, _partial), iou_types=("segm",))["segm"]
    assert ours["AP"] == pytest.approx(0.3) and ours["AP50"] == pytest.approx(1.0)
    assert ours["AP75"] == pytest.approx(0.0)
    assert math.isclose(PARTIAL / SIDE**2, 0.625)
