"""bench/label_throughput.py: the real-photo mode's data lookup, subset and clean skip (the
bench itself runs minutes, not in tests)."""

from __future__ import annotations

import json
import os

import pytest

from exits.data.synthetic import write_demo_dataset


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench/label_throughput.py")


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> str:
    """A directory laid out like a real-photo set: images/ and annotations/instances_*.json."""
    root = str(tmp_path_factory.mktemp("photos"))
    write_demo_dataset(root, num_images=5, image_size=64, seed=3, val_fraction=0.0)
    return root


def test_arguments(bench) -> None:
    assert bench.parse_args([]).data == bench.SYNTHETIC
    args = bench.parse_args(["--data", "coco_mini", "--images", "64", "--pools", "1x1,2x0.75"])
    assert (args.data, args.images, args.pools) == ("coco_mini", 64, "1x1,2x0.75")


def test_absent_data_skips_cleanly(bench, tmp_path, monkeypatch, capsys) -> None:
    # an existing directory without the files, and a profile whose data is nowhere
    assert bench.find_photos(str(tmp_path)) is None
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "REPO", str(tmp_path))
    assert bench.find_photos("coco_mini") is None
    result = bench.main(["--data", "coco_mini"])
    assert result == {"skipped": "real-photo data 'coco_mini' not found", "data": "coco_mini"}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_unknown_profile_is_an_error(bench) -> None:
    with pytest.raises(FileNotFoundError, match="no dataset config 'no_such_set'"):
        bench.find_photos("no_such_set")


def test_directory_and_subset(bench, photos_dir) -> None:
    found = bench.find_photos(photos_dir)
    assert found == {
        "annotations": os.path.join(photos_dir, "annotations", "instances_train.json"),
        "images": os.path.join(photos_dir, "images"),
    }
    with open(found["annotations"]) as f:
        coco = json.load(f)
    photos = bench.Photos(found["annotations"], found["images"])
    sub = photos.subset(2)  # images 1 and 2 (ids by order), every instance of theirs
    want = sorted(a["id"] for a in coco["annotations"] if a["image_id"] in (1, 2))
    assert sorted(sub["instances"]["ann_id"].to_pylist()) == want
    assert sub["images"] == found["images"]
    assert photos.subset(5)["instances"].num_rows == len(coco["annotations"])
    for n in (0, 6):
        with pytest.raises(ValueError, match=f"{n} images asked, the set has 1..5"):
            photos.subset(n)


def test_too_many_images_fail_before_model_work(bench, photos_dir) -> None:
    with pytest.raises(ValueError, match="9 images asked"):
        bench.main(["--data", photos_dir, "--images", "9"])


def test_coco_mini_resolves_to_the_shared_photos(bench, coco128) -> None:
    found = bench.find_photos("coco_mini")
    assert os.path.samefile(found["images"], os.path.join(coco128, "images"))
    assert os.path.samefile(found["annotations"], os.path.join(coco128, "instances_train2017.json"))
