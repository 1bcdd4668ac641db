"""Issue 13, without Ray: every hostile annotation of the fixture is one error row with a clear
reason (prepare), paths never escape the images root, limits hold before any decode, clear
one-line errors for files that are not COCO jsons, EXIF orientation is one rule everywhere."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hostile_inputs import (
    BAD_ID_REASONS,
    SIZE,
    bomb_png,
    exif_jpeg,
    write_hostile_dataset,
)

from exits.data.images import ImageError, decode_image, image_uri, load_image_under
from exits.data.prepare import load_instances
from exits.data.validate import check_segmentation, rle_string_counts


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return write_hostile_dataset(str(root / "data"), str(root / "elsewhere"))


def reasons_by_ann(errors) -> dict:
    return {r["ann_id"]: r["reason"] for r in errors.to_pylist()}


def test_every_probe_is_one_error_row(hostile):
    """Items 1, 2, 3, 5, 7, 12, 14: NaN / 1e9 polygons (pycocotools segfault or 24 GB), bombs,
    declared 60000², non-integer ids, duplicate image ids, path escapes, missing height."""
    ann, images, expected = hostile
    inst, err = load_instances(ann, images)
    n_anns = len(json.load(open(ann))["annotations"])
    assert inst.num_rows + err.num_rows == n_anns  # every input exactly once
    assert sorted(inst["ann_id"].to_pylist()) == sorted(a for a, r in expected.items() if r is None)
    got = reasons_by_ann(err)
    for ann_id, want in expected.items():
        if want is not None:
            assert want in got[ann_id], (ann_id, got[ann_id])
    no_id = [r["reason"] for r in err.to_pylist() if r["ann_id"] is None]
    for want in BAD_ID_REASONS:  # item 5 / 14: the reason names the id that is not an int
        assert any(want in r for r in no_id), (want, no_id)
    assert all("annotation #" in r for r in no_id)


def test_path_escapes_reveal_nothing(hostile):
    """Item 12: "exists outside the root" and "missing" give one reason; nothing is read."""
    ann, images, _ = hostile
    _, err = load_instances(ann, images)
    got = reasons_by_ann(err)
    by_id = {i["id"]: i["file_name"] for i in json.load(open(ann))["images"] if isinstance(i, dict)}
    names = {27: by_id[15], 28: by_id[16]}  # exists outside the root / missing
    shape = {a: got[a].replace(repr(names.get(a, "")), "NAME") for a in (27, 28)}
    assert shape[27] == shape[28] == "missing image file: NAME"
    assert got[26] == "missing image file: '/etc/hostname'"
    with pytest.raises(ImageError, match="^missing image file"):
        load_image_under(images, "link.png")  # symlink out of the root
    for name in ("/etc/hostname", "../other/x.png", "a/../../x.png", "s3://b/x.png", ""):
        with pytest.raises(ImageError, match="^missing image file"):
            image_uri("s3://bucket/prefix", name)
    assert image_uri("s3://bucket/prefix", "a/./b.png") == "s3://bucket/prefix/a/b.png"


def test_bomb_never_decodes():
    """Item 2: a 3 KB PNG declaring 60000² is an ImageError before any pixel buffer."""
    data = bomb_png()
    assert len(data) < 8000
    with pytest.raises(ImageError, match="image too large"):
        decode_image(data)
    with pytest.raises(ImageError, match="image too large"):
        decode_image(bomb_png(9000, 9000), max_pixels=2**26)
    with pytest.raises(ImageError, match="differs from annotation"):
        decode_image(bomb_png(500, 400), expected=(96, 96))


def test_geometry_checks_name_the_problem():
    """Items 1 / 14: checks before pycocotools; clipped polygons; RLE decoding in Python."""
    with pytest.raises(ValueError, match="NaN"):
        check_segmentation([[0, 0, float("nan"), 0, 5, 5]], 10, 10)
    with pytest.raises(ValueError, match="outside the image"):
        check_segmentation([[0, 0, 1e7, 0, 5, 5]], 10, 10)
    with pytest.raises(ValueError, match="odd number"):
        check_segmentation([[0, 0, 5, 0, 5, 5, 1]], 10, 10)
    assert check_segmentation([[-0.5, 0, 10.5, 0, 5, 5]], 10, 10) == [[0, 0, 10, 0, 5, 5]]
    with pytest.raises(ValueError, match="size"):
        check_segmentation({"size": [5, 5], "counts": [100]}, 10, 10)
    with pytest.raises(ValueError, match="cover"):
        check_segmentation({"size": [10, 10], "counts": [5, 5]}, 10, 10)
    from pycocotools import mask as mask_utils

    m = np.zeros((7, 9), np.uint8)
    m[2:5, 3:8] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    assert sum(rle_string_counts(rle["counts"])) == 63
    check_segmentation({"size": [7, 9], "counts": rle["counts"].decode()}, 7, 9)


@pytest.mark.parametrize(
    "text, match",
    [
        ("not json {", "is not valid JSON"),
        ("[1, 2]", "top level must be a JSON object, got list"),
        ('{"images": null}', "'images' must be a list, got null"),
        ('{"annotations": {"a": 1}}', "'annotations' must be a list, got dict"),
    ],
)
def test_not_a_coco_json_is_one_clear_error(tmp_path, text, match):
    """Item 14: not-JSON, a top-level list and null lists: a ValueError, not a traceback."""
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_instances(str(path), str(tmp_path))


def test_empty_and_missing_annotations_are_empty_tables(tmp_path):
    """Item 4 (prepare side): no annotations key / an empty list -> empty tables."""
    for data in ({"images": [], "categories": []}, {"annotations": []}):
        path = tmp_path / "x.json"
        path.write_text(json.dumps(data))
        inst, err = load_instances(str(path), str(tmp_path))
        assert inst.num_rows == err.num_rows == 0


def test_exif_orientation_one_rule(tmp_path):
    """Item 16: the stored pixel grid everywhere (labelling, report, stage 2's mmcv loader);
    an annotation that follows the EXIF-rotated size is an error row that says so."""
    mmcv = pytest.importorskip("mmcv")
    data = exif_jpeg(height=40, width=64)
    assert decode_image(data).shape == (40, 64, 3)
    stage2 = mmcv.imfrombytes(data, flag="color_ignore_orientation", backend="cv2")
    assert stage2.shape[:2] == (40, 64)  # what exits.stage2.configs makes mmdet load
    assert mmcv.imfrombytes(data, flag="color", backend="cv2").shape[:2] == (64, 40)
    with pytest.raises(ImageError, match="transpose.*EXIF orientation 6"):
        decode_image(data, expected=(64, 40))
    (tmp_path / "r.jpg").write_bytes(data)
    coco = {"images": [{"id": 1, "file_name": "r.jpg", "height": 64, "width": 40},
                       {"id": 2, "file_name": "r.jpg", "height": 40, "width": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 20, 20]}],
            "categories": [{"id": 1, "name": "x"}]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(coco))
    inst, err = load_instances(str(tmp_path / "a.json"), str(tmp_path))
    assert inst["ann_id"].to_pylist() == [2]
    assert "EXIF" in err["reason"][0].as_py()


def test_stage2_loader_ignores_exif():
    """Item 16: every LoadImageFromFile of a stage-2 config decodes the stored grid."""
    from exits.stage2.configs import ignore_exif_orientation

    cfg = {"train_dataloader": {"dataset": {"pipeline": [{"type": "LoadImageFromFile"},
                                                         {"type": "Resize"}]}}}  # fmt: skip
    ignore_exif_orientation(cfg)
    step = cfg["train_dataloader"]["dataset"]["pipeline"][0]
    assert step["color_type"] == "color_ignore_orientation" and step["imdecode_backend"] == "cv2"


def test_prepare_limit_is_config(tmp_path):
    """Limits as config: data.max_image_pixels decides before any decode."""
    from PIL import Image

    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": SIZE, "width": SIZE}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20]}],
            "categories": [{"id": 1}]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(coco))
    inst, _ = load_instances(str(tmp_path / "a.json"), str(tmp_path))
    assert inst.num_rows == 1
    _, err = load_instances(str(tmp_path / "a.json"), str(tmp_path), max_pixels=SIZE * SIZE - 1)
    assert "exceeds data.max_image_pixels" in err["reason"][0].as_py()
    assert os.path.exists(tmp_path / "a.png")


def _oversized_dataset(tmp_path, big_bytes: int) -> tuple[str, str]:
    """``big.png``: a valid 16x16 PNG extended (sparse, no disk used) to ``big_bytes``, holding
    annotations 1, 2, 3; ``small.png`` a valid 16x16 PNG holding annotation 4."""
    from PIL import Image

    for name in ("big.png", "small.png"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name)
    os.truncate(tmp_path / "big.png", big_bytes)
    box = [2, 2, 8, 8]
    coco = {"images": [{"id": 1, "file_name": "big.png", "height": 16, "width": 16},
                       {"id": 2, "file_name": "small.png", "height": 16, "width": 16}],
            "annotations": [{"id": k, "image_id": 1 if k < 4 else 2, "category_id": 1,
                             "bbox": box} for k in (1, 2, 3, 4)],
            "categories": [{"id": 1}]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return str(tmp_path / "a.json"), str(tmp_path)


def test_prepare_refuses_files_over_the_byte_limit(tmp_path):
    """Issue 26 item 5 at prepare: a file over ``data.max_image_bytes`` (default 64 MiB) is an
    error row for each of its annotations, from its size alone (never read), so training and
    labelling never see it; every annotation appears exactly once."""
    from exits.config import DataConfig

    big = DataConfig.max_image_bytes + 1  # 64 MiB + 1, sparse
    ann, root = _oversized_dataset(tmp_path, big)
    inst, err = load_instances(ann, root)  # the default limit
    assert inst["ann_id"].to_pylist() == [4]
    want = f"image file too large: {big} bytes exceeds data.max_image_bytes = {big - 1}"
    assert reasons_by_ann(err) == {1: want, 2: want, 3: want}
    assert err["image_id"].to_pylist() == [1, 1, 1]
    # one byte more than the small file: it passes; one byte less: refused too
    small = os.path.getsize(os.path.join(root, "small.png"))
    inst, err = load_instances(ann, root, max_bytes=small)
    assert inst["ann_id"].to_pylist() == [4] and sorted(err["ann_id"].to_pylist()) == [1, 2, 3]
    inst, err = load_instances(ann, root, max_bytes=small - 1)
    assert inst.num_rows == 0 and sorted(err["ann_id"].to_pylist()) == [1, 2, 3, 4]
    assert reasons_by_ann(err)[4] == (
        f"image file too large: {small} bytes exceeds data.max_image_bytes = {small - 1}"
    )
    inst, _ = load_instances(ann, root, max_bytes=None)  # no limit: the header is fine
    assert sorted(inst["ann_id"].to_pylist()) == [1, 2, 3, 4]


def test_sharded_prepare_and_pipeline_pass_the_configured_byte_limit(tmp_path, monkeypatch):
    """The sharded prepare (its shard tasks) takes ``max_bytes``, and the pipeline's prepare
    stage passes ``data.max_image_bytes`` from the config to it."""
    from exits.config import DataConfig
    from exits.data.coco import read_table
    from exits.data.prepare import prepare_instances

    ann, root = _oversized_dataset(tmp_path, 5000)
    out = tmp_path / "out"
    c = prepare_instances(ann, root, str(out / "instances.parquet"), str(out / "errors.parquet"),
                          shard_images=1, use_ray=False, max_bytes=4999)  # fmt: skip
    assert (c["instances"], c["errors"]) == (1, 3)
    err = read_table(str(out / "errors.parquet"))
    assert sorted(err["ann_id"].to_pylist()) == [1, 2, 3]
    assert set(err["reason"].to_pylist()) == {
        "image file too large: 5000 bytes exceeds data.max_image_bytes = 4999"
    }
    import exits.data.prepare as prep
    from exits.pipeline import prepare as stage

    seen = []
    monkeypatch.setattr(prep, "prepare_instances", lambda *a, **kw: seen.append(kw) or {
        "instances": 0, "errors": 0, "separated": 0, "shards": 0})  # fmt: skip
    monkeypatch.setattr(stage.manifest, "write_manifest", lambda *a, **kw: kw)
    cfg = type("Cfg", (), {"data": DataConfig(annotations=ann, images=root, max_image_bytes=1234)})
    stage.run_prepare(cfg, str(tmp_path / "run"), "fp")
    assert [kw["max_bytes"] for kw in seen] == [1234]


def test_training_crops_take_the_byte_limit(tmp_path):
    """A file that grew past ``data.max_image_bytes`` after prepare is refused by the training
    / eval crops before it is read (``CropDataset(max_image_bytes=...)``); None reads it."""
    from exits.train.data import CropDataset, CropSpec

    ann, root = _oversized_dataset(tmp_path, 5000)
    inst, _ = load_instances(ann, root, max_bytes=None)  # as prepared before the file grew
    spec = CropSpec(size=32, train=False)
    assert CropDataset(inst, root, spec)[0]["image"].shape == (3, 32, 32)
    with pytest.raises(ImageError, match="^image file too large: 5000 bytes exceeds .* = 4999$"):
        CropDataset(inst, root, spec, max_image_bytes=4999)[0]
