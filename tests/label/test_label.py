"""Stage 1c pseudo-labelling: S3 round trip, resume exactly once, bad input, COCO export, job."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from exits import storage
from exits.config import CropConfig, LabelConfig
from exits.data.coco import INSTANCE_SCHEMA, read_table
from exits.data.prepare import load_instances
from exits.label import (
    InjectedFault,
    OutputMismatch,
    assign_shards,
    image_blocks,
    image_rows,
    label_instances,
    mask_from_logits,
    read_errors,
    read_masks,
    scan_input,
    shard_uri,
    verify_outputs,
)
from exits.label import plan as label_plan

CROP = CropConfig(size=96)  # vit_tiny_demo input size
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_cfg(**kw) -> LabelConfig:
    return LabelConfig(**{"batch_size": 4, "images_per_block": 1, "num_actors": 1, **kw})


@pytest.fixture(scope="module")
def ray_cluster(moto_server, ray_local):
    """Local Ray started after the moto env is set (workers inherit it)."""


@pytest.fixture(scope="module")
def generator_ckpt(tiny_generator_ckpt) -> str:
    return tiny_generator_ckpt


def decode(row: dict) -> np.ndarray:
    rle = json.loads(row["segmentation"])
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def assert_inside_box(row: dict, hw: tuple[int, int]) -> None:
    mask = decode(row)
    assert mask.shape == hw
    x, y, w, h = row["bbox"]
    inside = np.zeros(hw, bool)
    inside[int(np.floor(y)) : int(np.ceil(y + h)), int(np.floor(x)) : int(np.ceil(x + w))] = True
    assert not (mask & ~inside).any(), f"mask of {row['ann_id']} leaks out of its box"
    assert row["area"] == mask.sum()


# ---------------------------------------------------------------------------------- units
def test_shards_and_image_rows_are_deterministic():
    rows = [
        {"image_id": i, "ann_id": 100 + k, "category_id": 1, "file_name": f"{i}.png", "height": 10,
         "width": 10, "bbox": [0.0, 0.0, 5.0, 5.0], "extreme_points": None, "supervision": "box"}
        for k, i in enumerate([5, 3, 5, 9, 1, 3])
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)
    a = assign_shards(table, 2)
    b = assign_shards(table.take([5, 4, 3, 2, 1, 0]), 2)
    assert (
        a["shard"].to_pylist() == b["shard"].to_pylist() == [0, 0, 0, 1, 1, 1]
    )  # images 1, 3 | 5, 9
    assert a["ann_id"].to_pylist() == [104, 101, 105, 100, 102, 103]
    per_image = image_rows(a)
    assert per_image["image_id"].to_pylist() == [1, 3, 5, 9]
    assert per_image["ann_id"].to_pylist() == [[104], [101, 105], [100, 102], [103]]


def test_plan_streams_the_table_part_by_part(tmp_path, monkeypatch):
    """The driver's two passes over a sharded Parquet table (parts of 3 rows): ids, shards and
    image rows equal the whole-table functions'; the digest follows every input value."""
    import pyarrow.parquet as pq

    rows = [
        {"image_id": i, "ann_id": 100 + k, "category_id": 1, "file_name": f"{i}.png", "height": 10,
         "width": 10, "bbox": [0.0, 0.0, 5.0, float(k + 1)], "extreme_points": None,
         "supervision": "box"}
        for k, i in enumerate([1, 3, 1, 5, 5, 9, 9])
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)
    uri = tmp_path / "instances.parquet"
    uri.mkdir()
    pq.write_table(table.slice(0, 3), uri / "part-00000.parquet")  # images 1, 3, 1
    pq.write_table(table.slice(3), uri / "part-00001.parquet")  # images 5, 5, 9, 9
    monkeypatch.setattr(label_plan, "PART_ROWS", 3)  # part 1 is read as batches of 3 + 1 rows
    scan = scan_input(str(uri), 2)
    assert scan.ann_id.tolist() == [100, 101, 102, 103, 104, 105, 106]
    assert scan.shard.tolist() == [0, 0, 0, 1, 1, 1, 1]  # images 1, 3 | 5, 9
    assert scan.image_ids.tolist() == [1, 3, 5, 9] and scan.num_shards == 2
    assert scan.file_names == ["1.png", "3.png", "5.png", "9.png"]
    whole = assign_shards(table, 2)
    assert dict(zip(whole["ann_id"].to_pylist(), whole["shard"].to_pylist())) == dict(
        zip(scan.ann_id.tolist(), scan.shard.tolist())
    )
    blocks = list(image_blocks(str(uri), scan.image_ids, 2, set(), images_per_block=2))
    assert all(b.num_rows <= 2 for b in blocks)
    got = pa.concat_tables(blocks)
    # image 9's rows straddle the 3-row batches of part 1: two rows, each ann_id once
    assert got["image_id"].to_pylist() == [1, 3, 5, 9, 9]
    assert got["ann_id"].to_pylist() == [[100, 102], [101], [103, 104], [105], [106]]
    assert got["shard"].to_pylist() == [0, 0, 1, 1, 1]
    todo = pa.concat_tables(image_blocks(str(uri), scan.image_ids, 2, {0}, images_per_block=8))
    assert todo["image_id"].to_pylist() == [5, 9, 9]
    # the same content read from memory gives the same ids and shards
    mem = scan_input(table, 2)
    assert sorted(mem.ann_id.tolist()) == sorted(scan.ann_id.tolist())
    # the digest: same input same digest; one changed box value changes it
    assert scan_input(str(uri), 2).digest == scan.digest
    changed = table.set_column(
        table.schema.get_field_index("bbox"), "bbox",
        pa.array([r["bbox"][:3] + [r["bbox"][3] + (k == 5)] for k, r in enumerate(rows)],
                 pa.list_(pa.float64(), 4)),
    )  # fmt: skip
    pq.write_table(changed.slice(3), uri / "part-00001.parquet")
    assert scan_input(str(uri), 2).digest != scan.digest
    # rows of image 1 in both parts (not prepare's layout): a row per part, each ann_id once
    pq.write_table(table.slice(3).set_column(0, "image_id", pa.array([5, 5, 9, 1])),
                   uri / "part-00001.parquet")  # fmt: skip
    scan = scan_input(str(uri), 2)
    assert scan.shard.tolist() == [0, 0, 0, 1, 1, 1, 0]
    got = pa.concat_tables(image_blocks(str(uri), scan.image_ids, 2, set(), images_per_block=8))
    assert got["image_id"].to_pylist() == [1, 3, 5, 9, 1]
    assert sorted(a for ids in got["ann_id"].to_pylist() for a in ids) == list(range(100, 107))
    dup = table.set_column(1, "ann_id", pa.array([100, 101, 102, 103, 104, 105, 100]))
    with pytest.raises(ValueError, match="duplicate ann_id"):
        scan_input(dup, 2)
    with pytest.raises(ValueError, match="lacks columns"):
        scan_input(table.drop_columns(["bbox"]), 2)
    with pytest.raises(FileNotFoundError):
        scan_input(str(tmp_path / "nothing"), 2)


def test_mask_from_logits_zero_outside_box():
    logits = np.full((24, 24), 5.0, np.float32)  # everything foreground in crop space
    box = np.array([20.0, 30.0, 50.0, 60.0])
    crop_box = np.array([15.5, 25.5, 54.5, 64.5])
    mask, score = mask_from_logits(logits, box, crop_box, (96, 96), 0.5)
    assert mask.sum() == 30 * 30 and mask[30:60, 20:50].all()
    # expected IoU with all n box pixels in the mask at p = sigmoid(5): sum(p) / n = sigmoid(5)
    assert score == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-4)


def test_crop_and_paste_carry_the_clicks_and_score_each_mask(tmp_path):
    """crop_images -> (stub logits) -> paste_masks without Ray: the extreme points travel with
    the row (NaN for box-only and error rows), every mask row carries its score, an error row
    none."""
    from exits.label.stages import crop_images, paste_masks

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    pts = [[15, 10], [10, 20], [22, 29], [29, 14]]  # box x 10..30, y 10..30
    rows = [
        {"image_id": 1, "ann_id": 7, "category_id": 1, "file_name": "a.png", "height": 40,
         "width": 40, "bbox": [10.0, 10.0, 20.0, 20.0], "extreme_points": pts,
         "supervision": "extreme_points"},
        {"image_id": 1, "ann_id": 8, "category_id": 1, "file_name": "a.png", "height": 40,
         "width": 40, "bbox": [0.0, 0.0, 8.0, 8.0], "extreme_points": None, "supervision": "box"},
        {"image_id": 1, "ann_id": 9, "category_id": 1, "file_name": "a.png", "height": 40,
         "width": 40, "bbox": [0.0, 0.0, 8.0, 8.0], "extreme_points": [[1, 1]] * 4,
         "supervision": "extreme_points"},
    ]  # fmt: skip
    table = assign_shards(pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA), 4)
    batch = crop_images(image_rows(table), images=str(tmp_path), size=32, enlarge=1.3)
    np.testing.assert_array_equal(batch["points"][0], pts)
    assert np.isnan(batch["points"][1:]).all()  # box-only and error rows: no clicks
    n = len(batch["ann_id"])
    batch.pop("crop")
    batch["logits"] = np.full((n, 8, 8), 4.0, np.float32)  # everything foreground
    batch["generator"] = np.full(n, "g", dtype=object)
    out = paste_masks(batch, threshold=0.5).to_pylist()
    assert [r["ann_id"] for r in out] == [7, 8, 9]
    # the box is all foreground at p = sigmoid(4): expected IoU sum(p) / n = sigmoid(4)
    assert out[0]["score"] == pytest.approx(1 / (1 + np.exp(-4.0)), rel=1e-5)
    assert out[1]["score"] == pytest.approx(1 / (1 + np.exp(-4.0)), rel=1e-5)
    assert out[2]["score"] is None and out[2]["reason"].startswith("degenerate extreme points")


# ---------------------------------------------------------------------- integration (Ray)
@pytest.fixture(scope="module")
def s3_run(ray_cluster, moto_server, demo_dataset, generator_ckpt):
    """Demo set + checkpoint uploaded to a moto bucket, labelled to s3://bucket/run."""
    import uuid

    import boto3

    bucket = f"exits-label-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    root = f"s3://{bucket}"
    storage.upload_dir(demo_dataset["images"], f"{root}/data/images")
    storage.write_bytes(f"{root}/data/train.json", open(demo_dataset["annotations"], "rb").read())
    storage.write_bytes(f"{root}/gen.pt", open(generator_ckpt, "rb").read())
    instances, _ = load_instances(
        f"{root}/data/train.json", f"{root}/data/images", check_files=False
    )
    summary = label_instances(
        instances, f"{root}/data/images", f"{root}/gen.pt", f"{root}/run", CROP, small_cfg(batch_size=8),
        shard_images=4,
    )  # fmt: skip
    return {"root": root, "instances": instances, "summary": summary}


@pytest.mark.slow
@pytest.mark.integration
def test_task_cpus_fit_beside_the_pool():
    from exits.label.stages import fit_task_cpus

    # 2 cores, 1 actor x 1 CPU: decode and paste share the core left, half each
    assert fit_task_cpus(LabelConfig(), 2.0) == 0.5
    # 2 actors x 0.75 CPU on 2 cores: (2 - 1.5) / 2
    pool = LabelConfig(num_actors=2, cpus_per_actor=0.75, cpus_per_task=0.5)
    assert fit_task_cpus(pool, 2.0) == 0.25
    # enough CPUs, or a smaller request: the request stands (never raised)
    assert fit_task_cpus(LabelConfig(), 16.0) == 1.0
    assert fit_task_cpus(LabelConfig(cpus_per_task=0.25), 2.0) == 0.25
    # pinned to a decode node type, or no CPU beside the pool: the config's value
    assert fit_task_cpus(LabelConfig(decode_resource="decode_node"), 2.0) == 1.0
    assert fit_task_cpus(LabelConfig(cpus_per_actor=2.0), 2.0) == 1.0


def test_label_to_s3_round_trip(s3_run):
    instances, summary, run = s3_run["instances"], s3_run["summary"], f"{s3_run['root']}/run"
    assert summary["masks"] == instances.num_rows and summary["errors"] == 0
    masks = read_masks(run)
    assert sorted(masks["ann_id"].to_pylist()) == sorted(instances["ann_id"].to_pylist())
    sizes = {r["ann_id"]: (r["height"], r["width"]) for r in instances.to_pylist()}
    for row in masks.to_pylist():
        assert_inside_box(row, sizes[row["ann_id"]])
        assert row["generator"] == summary["generator"] and 0.0 <= row["score"] <= 1.0
        assert row["supervision"] == "extreme_points"
    assert storage.exists(f"{run}/label/manifest.json")
    again = label_instances(
        instances, f"{s3_run['root']}/data/images", f"{s3_run['root']}/gen.pt", run, CROP,
        small_cfg(batch_size=8), shard_images=4,
    )  # fmt: skip
    assert again.get("cached") and again["masks"] == summary["masks"]


@pytest.mark.slow
@pytest.mark.integration
def test_export_coco_loads_with_pycocotools(s3_run, tmp_path):
    from pycocotools.coco import COCO

    from exits.label.export import export_coco

    root = s3_run["root"]
    out = f"{root}/run/label/pseudo_coco.json"
    stats = export_coco(f"{root}/run/label/masks", f"{root}/data/train.json", out)
    local = tmp_path / "pseudo.json"
    local.write_bytes(storage.read_bytes(out))
    coco = COCO(str(local))
    source = storage.read_json(f"{root}/data/train.json")
    assert coco.dataset["categories"] == source["categories"]
    assert len(coco.getImgIds()) == len(source["images"])
    assert (
        len(coco.getAnnIds())
        == stats["annotations"]
        == s3_run["summary"]["masks"] - stats["skipped_empty"]
    )
    for ann in coco.loadAnns(coco.getAnnIds()):
        m = coco.annToMask(ann)
        img = coco.imgs[ann["image_id"]]
        assert m.shape == (img["height"], img["width"]) and m.sum() == ann["area"] > 0
        assert ann["iscrowd"] == 0 and 0 <= ann["score"] <= 1
        assert ann["bbox"] == [
            float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m)))
        ]


@pytest.mark.slow
@pytest.mark.integration
def test_interrupt_and_resume_exactly_once(ray_cluster, demo_dataset, generator_ckpt, tmp_path):
    instances, _ = load_instances(
        demo_dataset["annotations"], demo_dataset["images"], check_files=False
    )
    run = str(tmp_path / "run")
    args = (instances, demo_dataset["images"], generator_ckpt, run, CROP)
    with pytest.raises(InjectedFault):
        label_instances(*args, small_cfg(fail_after_batches=5), shard_images=2)
    masks_dir = os.path.join(run, "label", "masks")
    before = {f: os.stat(os.path.join(masks_dir, f)).st_mtime_ns for f in os.listdir(masks_dir)}
    num_shards = json.loads(open(os.path.join(run, "label", "plan.json")).read())["num_shards"]
    assert 1 <= len(before) < num_shards, "the fault should hit part way through"
    with pytest.raises(OutputMismatch, match="missing"):
        verify_outputs(run, instances)
    summary = label_instances(*args, small_cfg(), shard_images=2)
    assert summary["shards_skipped"] == len(before)
    assert summary["shards_written"] == num_shards - len(before)
    after = {f: os.stat(os.path.join(masks_dir, f)).st_mtime_ns for f in os.listdir(masks_dir)}
    assert all(after[f] == t for f, t in before.items()), "finished shards were rewritten"
    ids = read_masks(run)["ann_id"].to_pylist() + read_errors(run)["ann_id"].to_pylist()
    assert sorted(ids) == sorted(instances["ann_id"].to_pylist())  # none missing, none twice
    # a duplicated shard file is caught loudly
    shutil.copy(shard_uri(run, "masks", 0), os.path.join(masks_dir, "shard-99999.parquet"))
    with pytest.raises(OutputMismatch, match="duplicated"):
        verify_outputs(run, instances)


@pytest.fixture
def bad_dataset(demo_dataset, tmp_path) -> dict:
    """The demo set with one corrupt JPEG, one missing file and one undersized image."""
    images = tmp_path / "images"
    shutil.copytree(demo_dataset["images"], images)
    data = json.loads(open(demo_dataset["annotations"]).read())
    corrupt, missing, small = data["images"][0], data["images"][1], data["images"][2]
    buf = io.BytesIO()
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(buf, format="JPEG")
    (images / "corrupt.jpg").write_bytes(buf.getvalue()[:300])
    corrupt["file_name"] = "corrupt.jpg"
    missing["file_name"] = "missing.png"
    Image.open(images / small["file_name"]).resize((64, 64)).save(images / "small.png")
    small["file_name"] = "small.png"  # the json still says 96 x 96
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return {"annotations": str(path), "images": str(images), "data": data}


@pytest.mark.slow
@pytest.mark.integration
def test_bad_input_becomes_error_rows(ray_cluster, bad_dataset, generator_ckpt, tmp_path):
    instances, _ = load_instances(
        bad_dataset["annotations"], bad_dataset["images"], check_files=False
    )
    rows = instances.to_pylist()
    by_image = {
        i["id"]: [r["ann_id"] for r in rows if r["image_id"] == i["id"]]
        for i in bad_dataset["data"]["images"][:3]
    }
    corrupt_img, missing_img, small_img = list(by_image)
    clean = [r for r in rows if r["image_id"] not in by_image]
    degenerate, box_only = clean[0], clean[1]
    degenerate["extreme_points"] = [[40, 40], [40, 40], [40, 40], [40, 40]]
    box_only["extreme_points"], box_only["supervision"] = None, "box"
    table = pa.Table.from_pylist(rows, schema=instances.schema)
    run = str(tmp_path / "run")
    summary = label_instances(
        table, bad_dataset["images"], generator_ckpt, run, CROP, small_cfg(), shard_images=3
    )
    errors = {r["ann_id"]: r for r in read_errors(run).to_pylist()}
    expected = {**{a: "corrupt image" for a in by_image[corrupt_img]},
                **{a: "missing image file" for a in by_image[missing_img]},
                **{a: "image size 64x64 differs from annotation 96x96" for a in by_image[small_img]},
                degenerate["ann_id"]: "degenerate extreme points"}  # fmt: skip
    assert set(errors) == set(expected)
    for ann_id, reason in expected.items():
        assert reason in errors[ann_id]["reason"] and errors[ann_id]["stage"] == "label"
    masks = read_masks(run)
    assert summary["masks"] == masks.num_rows == len(rows) - len(expected)
    box_row = [r for r in masks.to_pylist() if r["ann_id"] == box_only["ann_id"]][0]
    assert box_row["supervision"] == "box"
    assert_inside_box(box_row, (96, 96))


@pytest.mark.slow
@pytest.mark.integration
def test_job_end_to_end(ray_cluster, demo_dataset, generator_ckpt, tmp_path, capsys, load_script):
    job = load_script("jobs/pseudo_label.py")

    # one annotation the prepare stage rejects is carried into the errors output
    data = json.loads(open(demo_dataset["annotations"]).read())
    data["annotations"].append({**data["annotations"][0], "id": 10**6, "category_id": 999})
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    out = str(tmp_path / "run")
    summary = job.main(["--checkpoint", generator_ckpt, "--annotations", str(ann), "--images",
                    demo_dataset["images"], "--output", out, "--config", os.path.join(REPO, "configs", "label", "cpu.yaml"),
                    "--batch-size", "8", "label.shard_images=2"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        lines[-2].startswith("pseudo_label:") and json.loads(lines[-1])["masks"] == summary["masks"]
    )
    assert summary["prepare_errors"] == 1 and summary["instances"] == len(data["annotations"]) - 1
    # LabelConfig.shard_images (here from an override) sets the shard size of the job's run
    n_images = len({a["image_id"] for a in data["annotations"]})
    assert summary["shards"] == -(-n_images // 2) > 1
    assert summary["coco_json"] == os.path.join(out, "label", "pseudo_coco.json")
    prepare = read_table(os.path.join(out, "label", "errors", "prepare.parquet")).to_pylist()
    assert prepare[0]["ann_id"] == 10**6 and "unknown category" in prepare[0]["reason"]
    exported = json.loads(open(summary["coco_json"]).read())
    assert len(exported["annotations"]) == summary["masks"] - summary["empty_masks"]


def test_job_config_one_path_flags_win(load_script):
    """jobs/pseudo_label.py builds its config through exits.config.load_config: overrides
    apply, explicit flags win, --use-gpu is the config's device=cuda switch."""
    job = load_script("jobs/pseudo_label.py")
    cpu_yaml = os.path.join(REPO, "configs", "label", "cpu.yaml")
    args = job.parse_args(["--checkpoint", "ckpt.pt", "--annotations", "a.json", "--images", "img",
                           "--output", "out", "--config", cpu_yaml, "--batch-size", "8",
                           "--use-gpu", "label.shard_images=3", "label.batch_size=4"])  # fmt: skip
    cfg = job.build_config(args)
    assert cfg.label.shard_images == 3 and cfg.label.batch_size == 8 and cfg.crop.size == 96
    assert cfg.device == "cuda" and cfg.label.use_gpu and cfg.label.gpus_per_actor == 1.0
    assert job.EXPORT_NAME == "pseudo_coco.json"


# ------------------------------------------------------- the pretrained-encoder generator
PRETRAINED_SIZE = 56  # vit_small_dinov2 at a multiple of 14 (4x4 patches): small for a CPU test


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory) -> str:
    import torch

    from exits.checkpoints import read_checkpoint, save_model
    from exits.model.generator import build_generator

    torch.manual_seed(0)
    kwargs = {"img_size": PRETRAINED_SIZE, "trainable_blocks": 0}
    path = str(tmp_path_factory.mktemp("ckpt") / "generator.pt")
    save_model(path, build_generator("vit_small_dinov2", **kwargs), "vit_small_dinov2",
               "generator", kwargs)  # fmt: skip
    assert read_checkpoint(path)["builder"] == "vit_small_dinov2"
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_pretrained_generator_labels_exactly_once_after_resume(
    ray_cluster, demo_dataset, pretrained_ckpt, tmp_path
):
    instances, _ = load_instances(
        demo_dataset["annotations"], demo_dataset["images"], check_files=False
    )
    run = str(tmp_path / "run")
    crop = CropConfig(size=PRETRAINED_SIZE)
    cfg = {"batch_size": 4, "images_per_block": 1, "num_actors": 1}
    args = (instances, demo_dataset["images"], pretrained_ckpt, run, crop)
    with pytest.raises(InjectedFault):
        label_instances(*args, LabelConfig(**cfg, fail_after_batches=3), shard_images=2)
    done = len(os.listdir(os.path.join(run, "label", "masks")))
    num_shards = json.loads(open(os.path.join(run, "label", "plan.json")).read())["num_shards"]
    assert 1 <= done < num_shards
    summary = label_instances(*args, LabelConfig(**cfg), shard_images=2)
    assert summary["shards_skipped"] == done
    verify_outputs(run, instances)
    ids = read_masks(run)["ann_id"].to_pylist() + read_errors(run)["ann_id"].to_pylist()
    assert sorted(ids) == sorted(instances["ann_id"].to_pylist())
    from exits.checkpoints import read_checkpoint

    assert set(read_masks(run)["generator"].to_pylist()) == {read_checkpoint(pretrained_ckpt)["id"]}
