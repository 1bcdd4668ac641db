"""bench/retention.py: argument validation (the bench itself runs ~30 min, not in tests)."""

from __future__ import annotations

import os

import pytest

from exits.config import load_config
from exits.stage2.train_eval import batch_override


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench/retention.py")


def test_runs_are_validated(bench) -> None:
    s2 = load_config("demo").stage2
    assert bench.validate(bench.parse_args([]), s2) == ["exits", "exits_top90", "box_only", "gt"]
    assert bench.validate(bench.parse_args(["--runs", "gt"]), s2) == ["gt"]
    with pytest.raises(ValueError, match="box-only"):
        bench.validate(bench.parse_args(["--runs", "exits,box-only"]), s2)


def test_workers_that_cannot_fit_fail_fast(bench) -> None:
    s2 = load_config("demo").stage2  # 1 worker x 2 CPUs
    assert (s2.num_workers, s2.cpus_per_worker, s2.batch_size) == (1, 2, 4)
    with pytest.raises(ValueError, match="needs 4 CPUs"):
        bench.validate(bench.parse_args(["--num-workers", "2"]), s2)
    bench.validate(bench.parse_args(["--num-workers", "2", "--num-cpus", "4"]), s2)


def test_stage2_batch_override() -> None:
    s2 = load_config("demo").stage2
    assert batch_override(s2) == {"train_dataloader.batch_size": 4}
    assert batch_override(load_config("coco").stage2) == {}  # the profile's (mmdet's) batch


def test_default_profile_is_what_make_demo_runs(bench) -> None:
    """Retention is quoted for the demo profile that ships: the one `make demo` runs."""
    import re
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t.*pipeline\.py --dataset (\S+)", makefile, re.M)
    assert demo is not None and demo.group(1) == bench.FULL_CONFIG
    assert bench.parse_args([]).profile == bench.FULL_CONFIG
    assert load_config(bench.FULL_CONFIG).stage2 == load_config("demo").stage2


def test_seeds_are_parsed_and_validated(bench) -> None:
    s2 = load_config("demo").stage2
    assert bench.seeds_of(bench.parse_args([])) == [0]
    assert bench.seeds_of(bench.parse_args(["--seed", "4"])) == [4]
    assert bench.seeds_of(bench.parse_args(["--seed", "4", "--seeds", "0,1, 2"])) == [0, 1, 2]
    for bad in ("0,0", "a,1", ","):
        with pytest.raises(ValueError, match="--seeds"):
            bench.validate(bench.parse_args(["--seeds", bad]), s2)
    with pytest.raises(ValueError, match="--score-images"):
        bench.validate(bench.parse_args(["--score-images", "-1"]), s2)
    args = bench.parse_args([])
    bench.validate(args, s2)
    assert args.score_images == bench.SCORE_IMAGES
    quick = bench.parse_args(["--quick"])
    bench.validate(quick, s2)
    assert quick.score_images == 0  # the smoke run scores on the pipeline's val split


def test_verdict_quotes_retention_only_when_gt_beats_box_beyond_the_spread(bench) -> None:
    ap = {
        "exits": {0: 0.027, 1: 0.028, 2: 0.023},
        "box_only": {0: 0.012, 1: 0.010, 2: 0.013},
        "gt": {0: 0.027, 1: 0.025, 2: 0.021},
    }
    v = bench.verdict(ap)
    assert v["median"] == pytest.approx({"exits": 0.027, "box_only": 0.012, "gt": 0.025})
    assert v["spread"] == pytest.approx({"exits": 0.005, "box_only": 0.003, "gt": 0.006})
    # hand-computed: gap 0.025 - 0.012 = 0.013 > noise max(0.006, 0.003)
    assert v["instrument"]["gt_minus_box"] == pytest.approx(0.013)
    assert v["instrument"]["noise"] == pytest.approx(0.006)
    assert v["instrument"]["tells"] is True and v["instrument"]["seeds"] == 3
    # per seed 0.027/0.027 = 1, 0.028/0.025 = 1.12, 0.023/0.021 = 1.0952...; median 1.0952
    assert v["retention_by_seed"] == pytest.approx({0: 1.0, 1: 1.12, 2: 0.023 / 0.021})
    assert v["retention"] == pytest.approx(0.023 / 0.021)

    # the session-6 instrument: 24 val images, GT 0.061/0.051/0.064 vs box 0.047 at seed 0
    noisy = {"exits": {0: 0.090, 1: 0.066, 2: 0.053}, "box_only": {0: 0.047},
             "gt": {0: 0.061, 1: 0.051, 2: 0.064}}  # fmt: skip
    v = bench.verdict(noisy)
    assert v["instrument"]["gt_minus_box"] == pytest.approx(0.014)
    assert v["instrument"]["noise"] == pytest.approx(0.013)
    assert v["instrument"]["tells"] is False  # 0.014 > 0.013, but the box ran at one seed
    assert v["retention"] is None and v["retention_by_seed"][0] == pytest.approx(0.090 / 0.061)
    noisy["box_only"] |= {1: 0.046, 2: 0.048}
    assert bench.verdict(noisy)["instrument"]["tells"] is True  # by a hair: 0.014 > 0.013
    noisy["box_only"][1] = 0.060  # a box seed near GT widens the spread past the gap
    assert bench.verdict(noisy)["instrument"]["tells"] is False
    assert bench.verdict(noisy)["retention"] is None

    two_seeds = {k: {s: a for s, a in v.items() if s < 2} for k, v in ap.items()}
    assert bench.verdict(two_seeds)["instrument"]["tells"] is False  # < 3 seeds: no verdict
    assert bench.verdict(two_seeds)["retention"] is None
    no_box = {k: v for k, v in ap.items() if k != "box_only"}
    assert bench.verdict(no_box)["instrument"]["gt_minus_box"] is None
    assert bench.verdict(no_box)["retention"] is None


def test_scoring_set_is_drawn_apart_from_the_training_data(bench, tmp_path) -> None:
    import json

    cfg = load_config("demo_quick")
    piped = {"val_annotations": "v.json", "val_images": "imgs"}
    assert bench.scoring_set(piped, cfg, str(tmp_path), 0) == piped
    score = bench.scoring_set(piped, cfg, str(tmp_path), 6)
    gt = json.loads(open(score["val_annotations"]).read())
    assert len(gt["images"]) == 6 and gt["annotations"]
    names = {im["file_name"] for im in gt["images"]}
    assert all(os.path.isfile(os.path.join(score["val_images"], n)) for n in names)
    # its own seed: other pixels than the profile's own images of the same index
    from exits.data.synthetic import write_demo_dataset

    own = write_demo_dataset(
        str(tmp_path / "own"), num_images=6, image_size=cfg.data.synthetic_image_size,
        seed=cfg.data.synthetic_seed, val_fraction=1.0,
    )  # fmt: skip
    a = open(os.path.join(score["val_images"], "demo_00000.png"), "rb").read()
    b = open(os.path.join(own["images"], "demo_00000.png"), "rb").read()
    assert a != b


def test_leave_out_weakest_drops_the_lowest_scores(bench, tmp_path) -> None:
    import json

    scores = [0.9, 0.2, 0.5, 0.2, 0.8, 0.7, 0.6, 0.95, 0.3, 0.4, 0.85, 0.1]  # ids 1..12
    src = {"images": [{"id": 1}], "categories": [{"id": 3}],
           "annotations": [{"id": i + 1, "score": s} for i, s in enumerate(scores)]}  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(src))
    out = tmp_path / "top.json"
    # 10 % of 12 -> floor(1.2) = 1 left out: the lowest, id 12 (0.1)
    got = bench.leave_out_weakest(str(tmp_path / "p.json"), str(out))
    assert got == {"annotations": 11, "left_out": 1, "cut_score": 0.2}
    kept = json.loads(out.read_text())
    assert [a["id"] for a in kept["annotations"]] == list(range(1, 12))
    assert kept["images"] == src["images"] and kept["categories"] == src["categories"]
    # 25 %: floor(3) = 3: 0.1 (id 12), then the tie at 0.2 by id: 2, 4
    got = bench.leave_out_weakest(str(tmp_path / "p.json"), str(out), fraction=0.25)
    assert got == {"annotations": 9, "left_out": 3, "cut_score": 0.3}
    assert {a["id"] for a in json.loads(out.read_text())["annotations"]} == set(range(1, 13)) - {
        2,
        4,
        12,
    }
    src["annotations"][4].pop("score")
    (tmp_path / "p.json").write_text(json.dumps(src))
    with pytest.raises(ValueError, match="without a score, e.g. id 5"):
        bench.leave_out_weakest(str(tmp_path / "p.json"), str(out))


def test_kept_miou_scores_only_the_kept_instances(bench, tmp_path) -> None:
    import json

    import numpy as np
    from pycocotools import mask as mask_utils

    def rle(x0, x1):  # a 10x10 image, columns x0..x1-1 of rows 0..4 set
        m = np.zeros((10, 10), np.uint8, order="F")
        m[:5, x0:x1] = 1
        r = mask_utils.encode(m)
        return {"size": r["size"], "counts": r["counts"].decode()}

    image = {"id": 1, "width": 10, "height": 10}
    gt = {"images": [image], "categories": [{"id": 3}], "annotations": [
        {"id": i, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 20,
         "bbox": [0, 0, 4, 5], "segmentation": rle(0, 4)} for i in (1, 2, 3)]}  # fmt: skip
    # id 1 exact (IoU 1), id 2 half of it (10 / 20 = 0.5); id 3 left out by the cut
    kept = {"images": [image], "categories": [{"id": 3}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": rle(0, 4), "score": 0.9},
        {"id": 2, "image_id": 1, "category_id": 3, "segmentation": rle(0, 2), "score": 0.5}]}  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "kept.json").write_text(json.dumps(kept))
    got = bench.kept_miou(str(tmp_path / "gt.json"), str(tmp_path / "kept.json"))
    assert got["count"] == 2 and got["miou"] == pytest.approx(0.75)
