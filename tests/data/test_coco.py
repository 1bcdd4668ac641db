"""Annotations -> instance table: bad-record law, RLE round trip, LVIS fields, real COCO."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from exits.data.coco import read_table, segmentation_to_rle, write_table
from exits.data.images import ImageError, decode_image
from exits.data.prepare import load_instances


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    m = rng.random((37, 53)) > 0.6
    rle = segmentation_to_rle(_rle(m), 37, 53)
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), m)
    # uncompressed RLE and polygons are accepted too
    unc = {"size": [4, 4], "counts": [5, 2, 2, 2, 5]}
    np.testing.assert_array_equal(
        mask_utils.decode(segmentation_to_rle(unc, 4, 4))[:, 1], [0, 1, 1, 0]
    )
    poly = segmentation_to_rle([[1, 1, 6, 1, 6, 6, 1, 6]], 8, 8)
    assert mask_utils.area(poly) > 20


def test_decode_normalises_modes():
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    assert decode_image(_png(g)).shape == (8, 8, 3)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    out = decode_image(_png(rgba, "RGBA"))
    assert out.shape == (8, 8, 3) and out[0, 0, 0] == 200
    sixteen = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    out = decode_image(_png(sixteen))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert out[-1, -1, 0] == round(63000 / 65535 * 255)
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(_jpeg(np.zeros((32, 32, 3), np.uint8))[:200])
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(b"not an image")


@pytest.fixture
def bad_dataset(tmp_path):
    """A COCO file seeded with every kind of bad record, and the reasons expected for each."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    h, w = 40, 50
    rgb = np.full((h, w, 3), 120, np.uint8)
    (img_dir / "good.png").write_bytes(_png(rgb))
    (img_dir / "gray.png").write_bytes(_png(rgb[..., 0]))
    (img_dir / "rgba.png").write_bytes(_png(np.dstack([rgb, rgb[..., :1]]), "RGBA"))
    (img_dir / "deep.png").write_bytes(_png(rgb[..., 0].astype(np.uint16) * 256))
    (img_dir / "corrupt.jpg").write_bytes(_jpeg(rgb)[:150])
    (img_dir / "small.png").write_bytes(_png(rgb[:20]))
    images = [
        {"id": i + 1, "file_name": n, "height": h, "width": w}
        for i, n in enumerate(
            [
                "good.png",
                "gray.png",
                "rgba.png",
                "deep.png",
                "corrupt.jpg",
                "missing.png",
                "small.png",
            ]
        )
    ]
    m = np.zeros((h, w), bool)
    m[10:30, 5:25] = True
    segm = _rle(m)
    poly = [[5, 10, 24, 10, 24, 29, 5, 29]]

    def ann(i, image_id, **kw):
        a = {
            "id": i,
            "image_id": image_id,
            "category_id": 1,
            "segmentation": segm,
            "iscrowd": 0,
            "bbox": [5, 10, 20, 20],
            "area": 400,
        }
        a.update(kw)
        return a

    anns = [
        ann(1, 1),  # good, mask
        ann(2, 2, segmentation=poly),  # grayscale image, polygon: normalised
        ann(3, 3),  # RGBA: normalised
        ann(4, 4),  # 16-bit: normalised
        ann(5, 5),  # corrupt jpeg -> error
        ann(6, 6),  # missing file -> error
        ann(7, 7),  # image smaller than the json says -> error
        ann(8, 1, category_id=99),  # unknown category -> error
        ann(1, 1),  # duplicate id -> error
        ann(9, 1, extreme_points=[[10, 10]] * 4, segmentation=[]),  # degenerate points -> error
        ann(
            10, 1, extreme_points=[[15, 10], [5, 20], [15, 29], [24, 20]], segmentation=[]
        ),  # points in json
        ann(11, 1, segmentation=[], bbox=[3, 4, 10, 12]),  # boxes-only -> box supervision
        ann(12, 42),  # unknown image -> error
        ann(13, 1, iscrowd=1),  # crowd -> explicit skip row
        ann(14, 1, segmentation=_rle(np.zeros((h, w), bool))),  # empty mask -> error
    ]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    expected_errors = {
        5: "corrupt",
        6: "missing image file",
        7: "differs from annotation",
        8: "unknown category",
        1: "duplicate annotation id",
        9: "degenerate extreme points",
        12: "unknown image id",
        13: "crowd",
        14: "empty GT mask",
    }
    return str(path), str(img_dir), len(anns), expected_errors


def test_counts_law_and_reasons(bad_dataset):
    ann_path, img_dir, n_anns, expected = bad_dataset
    inst, err = load_instances(ann_path, img_dir)
    assert inst.num_rows + err.num_rows == n_anns
    reasons = {r["ann_id"]: r["reason"] for r in err.to_pylist()}
    assert set(reasons) == set(expected)
    for ann_id, fragment in expected.items():
        assert fragment in reasons[ann_id], (ann_id, reasons[ann_id])
    rows = {r["ann_id"]: r for r in inst.to_pylist()}
    assert set(rows) == {1, 2, 3, 4, 10, 11}
    assert rows[1]["extreme_points"] == [
        [14, 10],
        [5, 10],
        [24, 29],
        [24, 29],
    ]  # row-major protocol
    assert rows[1]["points_source"] == "mask"
    assert rows[2]["points_source"] == "polygon" and rows[10]["points_source"] == "json"
    assert rows[10]["extreme_points"] == [[15, 10], [5, 20], [15, 29], [24, 20]]
    assert rows[10]["bbox"] == [5.0, 10.0, 20.0, 20.0]
    assert rows[11]["supervision"] == "box" and rows[11]["extreme_points"] is None
    assert rows[11]["bbox"] == [3.0, 4.0, 10.0, 12.0]
    assert rows[1]["separated"] is False and rows[1]["area"] == 400


def test_lvis_coco_url_and_separated(tmp_path):
    img_dir = tmp_path / "imgs" / "train2017"
    img_dir.mkdir(parents=True)
    (img_dir / "000000000001.jpg").write_bytes(_jpeg(np.zeros((30, 30, 3), np.uint8)))
    m = np.zeros((30, 30), bool)
    m[2:8, 2:8] = True
    m[20:28, 15:25] = True  # second component
    data = {
        "images": [{"id": 1, "coco_url": "http://images.cocodataset.org/train2017/000000000001.jpg", "height": 30,
                    "width": 30, "not_exhaustive_category_ids": [], "neg_category_ids": [3]}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "segmentation": _rle(m), "bbox": [2, 2, 23, 26], "area": 116}],
        "categories": [{"id": 3, "name": "x", "frequency": "r"}],
    }  # fmt: skip
    p = tmp_path / "lvis.json"
    p.write_text(json.dumps(data))
    inst, err = load_instances(str(p), str(tmp_path / "imgs"))
    assert err.num_rows == 0
    row = inst.to_pylist()[0]
    assert row["file_name"] == "train2017/000000000001.jpg" and row["separated"] is True


def test_parquet_round_trip(tmp_path, demo_dataset):
    inst, err = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    write_table(inst, str(tmp_path / "i.parquet"))
    back = read_table(str(tmp_path / "i.parquet"))
    assert back.equals(inst)


def test_demo_set_properties(demo_dataset):
    inst, err = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    assert err.num_rows == 0 and inst.num_rows == demo_dataset["num_instances"]["train"]
    sep = np.mean(inst["separated"].to_pylist())
    assert sep >= 0.25, f"only {sep:.0%} separated objects"
    assert len(set(inst["category_id"].to_pylist())) >= 3


def test_real_coco_subset(coco128):
    inst, err = load_instances(f"{coco128}/instances_train2017.json", f"{coco128}/images")
    data = json.load(open(f"{coco128}/instances_train2017.json"))
    assert inst.num_rows + err.num_rows == len(data["annotations"])
    assert inst.num_rows == 887  # non-crowd instances (docs/architecture.md)
    assert sum(inst["separated"].to_pylist()) == 92
    assert all("crowd" in r for r in err["reason"].to_pylist())


def test_parquet_dataset_reads_parts_only(tmp_path) -> None:
    from exits.data.coco import parquet_dataset

    assert parquet_dataset(str(tmp_path / "absent")) is None
    table = tmp_path / "t"
    write_table(pa.table({"a": [1, 2]}), str(table / "part-00000.parquet"))
    write_table(pa.table({"a": [3]}), str(table / "part-00001.parquet"))
    (table / "part-00002.parquet.tmp-1234").write_bytes(b"half written")
    assert sorted(parquet_dataset(str(table)).to_table()["a"].to_pylist()) == [1, 2, 3]
    one = parquet_dataset(str(table / "part-00001.parquet"))
    assert one.to_table()["a"].to_pylist() == [3]


def test_scan_batches_and_filter_table_go_part_by_part(tmp_path):
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from exits.data.coco import filter_table, scan_batches

    root = tmp_path / "parts"
    root.mkdir()
    for k in range(3):  # parts of 5 rows: ann_id 10k .. 10k + 4
        t = pa.table({"ann_id": pa.array(range(10 * k, 10 * k + 5), pa.int64()),
                      "v": pa.array([float(k)] * 5)})  # fmt: skip
        pq.write_table(t, root / f"part-{k}.parquet")
    data = ds.dataset(str(root), format="parquet")
    batches = list(scan_batches(data, ["ann_id", "missing"], 3))
    # never across parts: 3 + 2 rows per part; a column the data lacks is skipped
    assert [b.num_rows for b in batches] == [3, 2] * 3
    assert batches[0].schema.names == ["ann_id"]
    assert sorted([i for b in batches for i in b["ann_id"].to_pylist()]) == sorted(
        data.to_table()["ann_id"].to_pylist()
    )
    wanted = pc.field("ann_id").isin(pa.array([1, 12, 24, 99], pa.int64()))
    got = filter_table(data, ["ann_id", "v"], wanted)
    assert sorted(zip(*got.to_pydict().values())) == [(1, 0.0), (12, 1.0), (24, 2.0)]
    empty = filter_table(data, ["v", "missing"], pc.field("ann_id") == 99)
    assert empty.num_rows == 0 and empty.schema.names == ["v"]
