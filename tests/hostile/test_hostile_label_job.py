"""Issue 13 on Ray (one session for the module): ``jobs/pseudo_label.py`` over the hostile
fixture finishes with one error row per bad input, resumes after a fault with correct counts,
refuses stale outputs, and finishes on inputs with nothing to label."""

from __future__ import annotations

import json
import os

import pytest
from hostile_inputs import write_hostile_dataset

from exits.label import read_errors, read_masks


@pytest.fixture(scope="module")
def checkpoint(tiny_generator_ckpt) -> str:
    return tiny_generator_ckpt


@pytest.fixture(scope="module")
def job(load_script):
    return load_script("jobs/pseudo_label.py")


def run_job(job, ckpt, ann, images, out, *extra):
    # threshold 0.99: the random generator's masks are all empty (exercises empty_masks)
    return job.main(["--checkpoint", ckpt, "--annotations", ann, "--images", images,
                     "--output", out, "--batch-size", "2", "--threshold", "0.99",
                     "label.images_per_block=1", *extra])  # fmt: skip


@pytest.mark.slow
@pytest.mark.integration
def test_hostile_job_finishes_resumes_and_refuses_stale(ray_local, checkpoint, job, tmp_path):
    """Items 1-3, 5, 7, 9, 10, 12, 14 end to end; item 8 (stale outputs) on the re-runs."""
    from exits.label import InjectedFault

    ann, images, expected = write_hostile_dataset(
        str(tmp_path / "d"), str(tmp_path / "out_of_root")
    )
    out = str(tmp_path / "run")
    with pytest.raises(InjectedFault):  # killed part way (after the first result batch)
        run_job(
            job, checkpoint, ann, images, out, "label.shard_images=1", "label.fail_after_batches=1"
        )
    summary = run_job(job, checkpoint, ann, images, out, "label.shard_images=1")
    n = len(json.load(open(ann))["annotations"])
    assert summary["masks"] + summary["errors"] + summary["prepare_errors"] == n
    assert summary["shards_skipped"] >= 1  # resumed
    plan = json.load(open(os.path.join(out, "label", "plan.json")))
    assert plan["shard_images"] == 1  # item 9: label.shard_images is honoured
    masks = read_masks(out)
    assert sorted(masks["ann_id"].to_pylist()) == [a for a, r in expected.items() if r is None]
    # item 10: empty_masks counts every shard, also those of the killed run
    assert (
        summary["empty_masks"] == sum(a == 0 for a in masks["area"].to_pylist()) == masks.num_rows
    )
    reasons = {
        r["ann_id"]: r["reason"] for r in read_errors(out).to_pylist() if r["ann_id"] is not None
    }
    for ann_id, want in expected.items():
        if want is not None:
            assert want in reasons[ann_id], (ann_id, reasons[ann_id])
    exported = json.load(open(os.path.join(out, "label", "pseudo_coco.json")))
    assert all(isinstance(i, dict) and isinstance(i["id"], int) for i in exported["images"])
    assert "/etc/hostname" not in {i["file_name"] for i in exported["images"]}

    # item 8: the same ids with a changed box: refused with a message, never "cached"
    data = json.load(open(ann))
    data["annotations"][0]["bbox"] = [22, 22, 30, 30]
    changed = str(tmp_path / "changed.json")
    json.dump(data, open(changed, "w"))
    with pytest.raises(ValueError, match="other inputs/settings"):
        run_job(job, checkpoint, changed, images, out, "label.shard_images=1")
    again = run_job(job, checkpoint, ann, images, out, "label.shard_images=1")
    assert again["cached"] and again["empty_masks"] == summary["empty_masks"]
    # an image replaced in place (same name): refused too (local roots: size + mtime)
    path = os.path.join(images, "good0.png")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="other inputs/settings"):
        run_job(job, checkpoint, ann, images, out, "label.shard_images=1")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("case", ["empty_list", "no_key", "all_invalid"])
def test_nothing_to_label_still_finishes(ray_local, checkpoint, job, tmp_path, case):
    """Item 4: export failed with FileNotFoundError .../label/masks (and again on re-run)."""
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 96, "width": 96}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}  # fmt: skip
    if case == "no_key":
        del data["annotations"]
    if case == "all_invalid":
        data["annotations"] = [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 9, 9]}]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(data))
    out = str(tmp_path / "run")
    for _ in range(2):  # and the re-run
        summary = run_job(job, checkpoint, str(ann), str(tmp_path), out)
        assert summary["masks"] == 0 and summary["exported"]["annotations"] == 0
        assert summary["prepare_errors"] == (case == "all_invalid")


@pytest.mark.slow
@pytest.mark.integration
def test_huge_declared_size_does_not_hang(ray_local, checkpoint, job, tmp_path):
    """Item 3: a json declaring 60000² for an ordinary image made the crop task ask Ray for
    321.9 GiB and hang; with the limit raised past it, the request is capped and the image is
    an error row (its header disagrees), the other image a mask."""
    from hostile_inputs import SIZE, good_image, png

    (tmp_path / "a.png").write_bytes(png(good_image(0)))
    data = {"images": [{"id": 1, "file_name": "a.png", "height": SIZE, "width": SIZE},
                       {"id": 2, "file_name": "a.png", "height": 60000, "width": 60000}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [20, 20, 40, 40]}
                            for i in (1, 2)],
            "categories": [{"id": 1, "name": "x"}]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(data))
    out = str(tmp_path / "run")
    summary = run_job(job, checkpoint, str(tmp_path / "a.json"), str(tmp_path), out,
                      "data.max_image_pixels=4000000000")  # fmt: skip
    assert summary["masks"] == 1 and summary["errors"] == 1
    (row,) = read_errors(out).to_pylist()
    assert row["ann_id"] == 2 and "differs from annotation 60000x60000" in row["reason"]


@pytest.mark.slow
@pytest.mark.integration
def test_two_jobs_on_one_output(ray_local, checkpoint, job, tmp_path):
    """Issue 26 item 1: a second job on an output another (live) run holds is refused before it
    writes anything; once that run is dead (kill -9: its lease stays, its pid is gone) the job
    takes over, removes leftovers of interrupted writes, and every annotation is there once."""
    from hostile_inputs import hold_in_subprocess

    from exits.lease import LeaseHeld, read_lease

    ann, images, expected = write_hostile_dataset(str(tmp_path / "d"), str(tmp_path / "o"))
    out = str(tmp_path / "run")
    other = hold_in_subprocess(out)  # a running job holds the output
    try:
        with pytest.raises(LeaseHeld, match=f"pid {other.pid}"):
            run_job(job, checkpoint, ann, images, out)
        assert sorted(os.listdir(out)) == ["lease.json", "lease.lock"]
    finally:
        other.kill()
        other.wait()
    os.makedirs(os.path.join(out, "label"))
    stale = os.path.join(out, "label", "pseudo_coco.json.tmp-0123abcd")
    open(stale, "wb").close()  # what kill -9 during export leaves
    summary = run_job(job, checkpoint, ann, images, out)
    n = len(json.load(open(ann))["annotations"])
    assert summary["masks"] + summary["errors"] + summary["prepare_errors"] == n
    ids = read_masks(out)["ann_id"].to_pylist() + [
        r for r in read_errors(out)["ann_id"].to_pylist() if r is not None
    ]
    assert sorted(ids) == sorted(expected)  # every annotation with an id exactly once
    assert not os.path.exists(stale) and read_lease(out) is None


@pytest.mark.slow
@pytest.mark.integration
def test_one_image_with_many_annotations_streams(ray_local, checkpoint, job, tmp_path):
    """Issue 26 item 10: 10,000 annotations on one image gave the first progress line after
    ~9 minutes (the whole image was one block). The image is split into pieces of
    batch_size * ROW_BATCHES instances, so the first results arrive after one piece."""
    from hostile_inputs import SIZE, good_image, png

    from exits.label.run import ROW_BATCHES

    (tmp_path / "a.png").write_bytes(png(good_image(0)))
    n = 96
    data = {"images": [{"id": 1, "file_name": "a.png", "height": SIZE, "width": SIZE}],
            "annotations": [{"id": i, "image_id": 1, "category_id": 1,
                             "bbox": [i % 50, i % 40, 30, 30]} for i in range(1, n + 1)],
            "categories": [{"id": 1, "name": "x"}]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(data))
    summary = run_job(job, checkpoint, str(tmp_path / "a.json"), str(tmp_path), str(tmp_path / "r"))
    assert summary["masks"] == n
    assert summary["first_result_rows"] <= 2 * ROW_BATCHES  # --batch-size 2: one piece
    assert sorted(read_masks(str(tmp_path / "r"))["ann_id"].to_pylist()) == list(range(1, n + 1))
