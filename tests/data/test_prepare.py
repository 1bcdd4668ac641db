"""Prepare at scale: streaming json, box-local rasterisation, sharded table == in-memory table."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from exits.data import jsonstream
from exits.data.coco import polygon_box_mask, read_table
from exits.data.prepare import (
    PART_FORMAT,
    annotation_dicts,
    load_columns,
    load_instances,
    prepare_instances,
)


def _full_vs_window(polys: list, h: int, w: int) -> bool:
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    full = mask_utils.decode(rle)
    mask, x0, y0 = polygon_box_mask(polys, h, w, rle)
    window = np.zeros_like(full)
    window[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    return np.array_equal(window, full)


def test_jsonstream_matches_json_load(tmp_path, monkeypatch):
    data = {"info": {"name": "ünïcode ✓", "n": 1.5e-3}, "annotations": [
        {"id": i, "segmentation": [[1.25, 2.5, 3, 4, 1e2, 6]], "s": "é" * (i % 5)}
        for i in range(40)], "images": [], "empty": {}, "licenses": [1, [2, [3]]]}  # fmt: skip
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    for chunk in (3, 7, 64, 1 << 20):  # chunk edges inside numbers, strings, UTF-8 characters
        monkeypatch.setattr(jsonstream, "CHUNK_BYTES", chunk)
        got: dict = {}
        for key, value in jsonstream.iter_members(str(path)):
            if key in ("annotations", "images"):
                got.setdefault(key, []).append(value)
            else:
                got[key] = value
        got.setdefault("images", [])
        assert got == data
    (tmp_path / "bad.json").write_text('{"annotations": [1, 2')
    with pytest.raises(ValueError, match="not valid JSON"):
        list(jsonstream.iter_members(str(tmp_path / "bad.json")))


def test_box_mask_equals_full_image_on_synthetic_polygons():
    rng = np.random.default_rng(0)
    for t in range(600):
        h, w = (int(v) for v in rng.integers(5, 300, 2))
        k = int(rng.integers(3, 30))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(0.5, 80) * rng.uniform(0.3, 1, k)
        centre = rng.uniform(-20, 20, 2) + rng.uniform(0, 1, 2) * [w, h]
        pts = centre + np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        pts = np.round(pts, 1 + t % 3)  # COCO-like decimals: x.1 * 5 sits on a rounding edge
        polys = [pts.ravel().tolist()]
        if t % 4 == 0:  # a second part, sometimes off the image
            polys.append((pts[::-1] + rng.uniform(-40, 40, 2)).ravel().tolist())
        assert _full_vs_window(polys, h, w), (t, polys, h, w)


def test_box_mask_equals_full_image_on_coco(coco128):
    data = json.load(open(f"{coco128}/instances_train2017.json"))
    imgs = {i["id"]: i for i in data["images"]}
    n = 0
    for a in data["annotations"]:
        if isinstance(a["segmentation"], list):
            img = imgs[a["image_id"]]
            polys = [p for p in a["segmentation"] if len(p) >= 6]
            assert _full_vs_window(polys, img["height"], img["width"]), a["id"]
            n += 1
    assert n == 887


@pytest.fixture
def odd_json(tmp_path, demo_dataset):
    """The demo set plus irregular records, ids repeated across image shards."""
    data = json.load(open(demo_dataset["annotations"]))
    anns = data["annotations"]
    first = anns[0]
    anns += [
        {**anns[-1], "id": first["id"]},  # duplicate of the first id, in another shard
        {**first, "id": 10_001, "segmentation": [["a", 1, 2, 3, 4, 5]]},  # string coordinate
        {**first, "id": 10_002, "segmentation": [[1, 1, 2, 2]]},  # too few vertices
        {**first, "id": "x"},  # non-integer id
        {**first, "id": "x", "image_id": anns[-1]["image_id"]},  # ... repeated
        {**first, "id": 10_003, "extreme_points": [[5, 2], [2, 5], [5, 9], [9, 5]]},
        {**first, "id": 10_004, "image_id": 99_999},  # unknown image
        {**first, "id": 10_005, "iscrowd": 1},
        {**first, "id": 10_006.0},  # integral float id
        {"image_id": first["image_id"]},  # no id
        7,  # not an object
    ]
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(data))
    return str(path), demo_dataset["images"], len(anns)


def _rows(table):
    return sorted(table.to_pylist(), key=lambda r: json.dumps(r, sort_keys=True))


def test_sharded_prepare_equals_in_memory(odd_json, tmp_path):
    ann, images, n = odd_json
    inst, err = load_instances(ann, images)
    assert inst.num_rows + err.num_rows == n
    reasons = " | ".join(err["reason"].to_pylist())
    for fragment in ("duplicate", "must be a list of numbers", "fewer than 3", "unknown image",
                     "crowd", "has no id"):  # fmt: skip
        assert fragment in reasons, fragment
    out = tmp_path / "prepare"
    c = prepare_instances(ann, images, str(out / "instances.parquet"),
                          str(out / "errors.parquet"), shard_images=3, use_ray=False)  # fmt: skip
    assert c["shards"] > 3 and c["instances"] == inst.num_rows and c["errors"] == err.num_rows
    parts = sorted(p.name for p in (out / "instances.parquet").iterdir())
    assert parts == [PART_FORMAT.format(s) for s in range(c["shards"])]
    assert not (out / "instances.parquet.work").exists()
    back = read_table(str(out / "instances.parquet"))
    assert back.schema.equals(inst.schema) and _rows(back) == _rows(inst)
    assert _rows(read_table(str(out / "errors.parquet"))) == _rows(err)
    assert c["separated"] == sum(inst["separated"].drop_null().to_pylist())
    # a re-run replaces the table (no stale parts); max_instances keeps the first rows
    c2 = prepare_instances(ann, images, str(out / "instances.parquet"), str(out / "errors.parquet"),
                           shard_images=1000, use_ray=False, max_instances=5)  # fmt: skip
    assert c2["shards"] == 1 and read_table(str(out / "instances.parquet")).num_rows == 5


def test_columns_keep_irregular_records_raw(tmp_path):
    poly = [[1, 1, 9, 1, 9, 9]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": poly, "bbox": [1, 1, 8, 8]},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [["a", 1, 9, 1, 9, 9]]},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[2**70, 1, 9, 1, 9, 9]]},
        {
            "id": 4,
            "image_id": 1,
            "category_id": 1,
            "segmentation": {"size": [2, 2], "counts": "04"},
        },
        {"id": True, "image_id": 1.0, "category_id": 1, "segmentation": poly},
        {"id": 6, "image_id": 1, "category_id": 1, "segmentation": poly, "extreme_points": None},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"annotations": anns, "images": [], "categories": []}))
    cols = load_columns(str(path)).annotations
    assert [r is not None for r in cols["raw"].to_pylist()] == [False] + [True] * 5
    # True is not an integer id (validate.as_id): null in the column, an error row later
    assert cols["id"].to_pylist() == [1, 2, 3, 4, None, 6] and cols["image_id"].to_pylist()[4] == 1
    assert cols["polygons"].to_pylist()[0] == [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]
    assert annotation_dicts(cols)[4] == anns[4] and annotation_dicts(cols)[0] == anns[0]


@pytest.mark.slow
@pytest.mark.integration
def test_prepare_as_ray_data_tasks(demo_dataset, tmp_path):
    ray = pytest.importorskip("ray")
    inst, err = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2,
             include_dashboard=False)  # fmt: skip
    try:
        c = prepare_instances(demo_dataset["annotations"], demo_dataset["images"],
                              str(tmp_path / "i.parquet"), str(tmp_path / "e.parquet"),
                              shard_images=4)  # fmt: skip
    finally:
        ray.shutdown()
    assert c["shards"] >= 3 and c["worker_peak_rss_bytes"] > 0
    assert _rows(read_table(str(tmp_path / "i.parquet"))) == _rows(inst)
    assert c["errors"] == err.num_rows == 0


@pytest.mark.integration
def test_prepare_and_stream_on_s3(s3_bucket, demo_dataset):
    """json streamed from S3, parts and errors written there, work dir removed."""
    from exits import storage

    storage.upload_dir(demo_dataset["images"], f"{s3_bucket}/images")
    storage.write_bytes(f"{s3_bucket}/a.json", open(demo_dataset["annotations"], "rb").read())
    inst, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    table = f"{s3_bucket}/run/prepare/instances.parquet"
    c = prepare_instances(f"{s3_bucket}/a.json", f"{s3_bucket}/images", table,
                          f"{s3_bucket}/run/prepare/errors.parquet", shard_images=5, use_ray=False)  # fmt: skip
    assert c["shards"] >= 3 and len(storage.list_dir(table)) == c["shards"]
    assert not storage.exists(table + ".work")
    assert _rows(read_table(table)) == _rows(inst)
