"""Issue 13, without Ray: evaluation never crashes on or silently scores hostile predictions
(items 6, 11), config errors surface at load time (items 9, 15) and the pipeline's prepare
fingerprint follows the json's content (item 8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from exits import evaluate as ev
from exits.config import load_config

H = W = 32


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def square(x0: int, side: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[x0 : x0 + side, x0 : x0 + side] = 1
    return m


def gt_json() -> dict:
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "segmentation": rle(square(4, 10)),
            "area": 100.0,
            "bbox": [4, 4, 10, 10],
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 2, 5, 5],
            "area": 25.0,
            "iscrowd": 0,
        },
    ]  # fmt: skip  (2: box-only, as labelling supports)
    return {"images": [{"id": 1, "file_name": "1.png", "height": H, "width": W}],
            "categories": [{"id": 1, "name": "a"}], "annotations": anns}  # fmt: skip


def test_box_only_gt_does_not_crash_the_miou():
    """Item 6: the eval stage crashed with KeyError 'segmentation' on box-only GT."""
    gt = gt_json()
    out = ev.pseudo_label_miou(gt, {"annotations": [{**gt["annotations"][0], "score": 1.0}]})
    assert out["all"] == {"miou": 1.0, "count": 1} and out["no_gt_mask"] == 1


def test_hostile_predictions_are_left_out_and_counted(caplog):
    """Item 11: unknown category / image id, box-only, NaN score, wrong-size RLE."""
    gt = gt_json()
    good = {"image_id": 1, "category_id": 1, "segmentation": rle(square(4, 10)), "score": 0.9}
    preds = [
        good,
        {**good, "category_id": 7},
        {**good, "image_id": 99},
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "score": 0.8},
        {**good, "score": float("nan")},
        {**good, "segmentation": rle(square(4, 10, 16, 16))},
    ]
    with caplog.at_level("WARNING"):
        out = ev.mask_ap(gt, preds)
    assert out["segm"]["AP"] > 0.5  # the good one scores; nothing raised
    assert out["skipped"]["segm"] == {
        "unknown category id": 1, "unknown image id": 1, "score is not a finite number": 1,
        "no segmentation (box-only prediction) in segm evaluation": 1,
        "segmentation does not fit its image (size or counts)": 1,
        "GT annotations without a mask (left out)": 1,  # the box-only GT (item 6)
    }  # fmt: skip
    assert "bbox" in out["skipped"] and "no segmentation" not in str(out["skipped"]["bbox"])
    assert "predictions left out" in caplog.text
    assert "predictions left out" in ev.markdown_report({"mask_ap": out})


def test_pseudo_with_unknown_ids_and_bad_files(tmp_path):
    """Item 11: --pseudo with unknown image ids (KeyError), a non-JSON file (raw traceback)."""
    gt = gt_json()
    pseudo = {"annotations": [{"id": 1, "image_id": 42, "category_id": 1,
                               "segmentation": rle(square(4, 10)), "score": 1.0}]}  # fmt: skip
    gp, pp = tmp_path / "gt.json", tmp_path / "p.json"
    gp.write_text(json.dumps(gt))
    pp.write_text(json.dumps(pseudo))
    m = ev.main(["--gt", str(gp), "--pseudo", str(pp), "--out", str(tmp_path / "o")])
    assert m["pseudo_label_ap"]["skipped"]["segm"]["unknown image id"] == 1
    assert (
        m["pseudo_label_miou"]["invalid_pseudo"] == 1 and m["pseudo_label_miou"]["all"]["miou"] == 0
    )
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(SystemExit, match="bad.json is not valid JSON"):
        ev.main(["--gt", str(gp), "--pred", str(tmp_path / "bad.json"), "--out", str(tmp_path)])


def test_val_json_is_made_fit_for_stage2_at_prepare(tmp_path):
    """Item 6: a val json without ``area`` failed stage 2 after every earlier stage ran; item
    12: an image entry outside the images root must not reach mmdet's loader either."""
    from exits.pipeline.prepare import _val_for_stage2

    gt = gt_json()
    for a in gt["annotations"]:
        a.pop("area")
    gt["images"] += [{"id": 2, "file_name": "/etc/hostname", "height": H, "width": W}, "junk"]
    gt["annotations"].append({"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 4, 4]})
    (tmp_path / "val.json").write_text(json.dumps(gt))
    out = _val_for_stage2(str(tmp_path / "val.json"), str(tmp_path / "run"), str(tmp_path))
    fixed = json.load(open(out))
    assert [a["area"] for a in fixed["annotations"]] == [100.0, 25.0]
    assert [i["id"] for i in fixed["images"]] == [1]
    assert _val_for_stage2(out, str(tmp_path / "run2")) == out  # fit: used as is


@pytest.mark.parametrize(
    "override, match",
    [
        ("label.threshold=2", r"label.threshold = 2 is outside \(0.0, 1.0\)"),
        ("generator.batch_size=0", "generator.batch_size"),
        ("retrieval.dropout=1.5", "retrieval.dropout"),
        ("retrieval.similarity=nope", "retrieval.similarity must be one of"),
        ("crop.inference_enlarge=nan", "must be finite"),
        ("label.shard_images=-1", "label.shard_images"),
        ("model.generator=vit_huge", "model.generator: unknown"),
        ("stage2.model=yolo", "stage2.model: unknown"),
    ],
)
def test_config_ranges_fail_at_load(override, match):
    """Item 15: type- and range-checked when loaded (before Ray starts or config.json)."""
    with pytest.raises(ValueError, match=match):
        load_config("demo", [override])
    with pytest.raises(TypeError, match="generator.epochs"):
        load_config("demo", ["generator.epochs=abc"])


def test_jobs_fail_before_ray(tmp_path, monkeypatch, load_script):
    """Items 9 / 15: --quick with another dataset, a bad value: no Ray, no output written."""
    import sys

    job = load_script("jobs/pipeline.py")
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` would fail the test
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--quick is the tiny demo profile"):
        job.main(["--dataset", "coco", "--quick", "--output", str(out)])
    with pytest.raises(ValueError, match="label.threshold"):
        job.main(["--output", str(out), "--set", "label.threshold=2"])
    assert not out.exists()
    pl = load_script("jobs/pseudo_label.py")
    args = pl.parse_args(["--checkpoint", "x", "--annotations", "a", "--images", "i",
                          "--output", str(out), "--crop-size", "96", "--threshold", "1.5"])  # fmt: skip
    with pytest.raises(ValueError, match="label.threshold"):
        pl.build_config(args)


def test_prepare_fingerprint_follows_the_json_content(tmp_path):
    """Item 8: editing the annotations json in place changes the prepare fingerprint (and so
    every later stage's): the pipeline redoes it instead of skipping."""
    from exits.pipeline import stage_fingerprints

    path = tmp_path / "a.json"
    path.write_text(json.dumps(gt_json()))
    cfg = load_config("demo", [f"data.annotations={path}", f"data.images={tmp_path}"])
    before = stage_fingerprints(cfg)
    data = gt_json()
    data["annotations"][0]["bbox"] = [5, 5, 9, 9]
    path.write_text(json.dumps(data))
    after = stage_fingerprints(cfg)
    assert all(before[s] != after[s] for s in before)
