"""Deterministic image-level splits (exits.data.split)."""

from __future__ import annotations

import hashlib

import pytest

from exits.data.split import holdout_ids, split_coco


def _coco(n: int) -> dict:
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(n)],
        "annotations": [{"id": 100 + i, "image_id": i % n} for i in range(2 * n)],
        "categories": [{"id": 1}],
    }


def test_holdout_is_the_lowest_sha256_ranks() -> None:
    ids = [5, 3, 9, 1]
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"holdout:{i}".encode()).hexdigest())
    assert holdout_ids(ids, 2) == set(rank[:2])
    assert holdout_ids(reversed(ids), 2) == holdout_ids(ids, 2)  # order-independent


def test_split_keeps_every_image_and_annotation_once() -> None:
    coco = _coco(128)
    train, held = split_coco(coco, 32)
    assert len(held["images"]) == 32 and len(train["images"]) == 96
    assert {im["id"] for im in train["images"]}.isdisjoint(im["id"] for im in held["images"])
    ann_ids = sorted(a["id"] for a in train["annotations"] + held["annotations"])
    assert ann_ids == sorted(a["id"] for a in coco["annotations"])
    held_ids = {im["id"] for im in held["images"]}
    assert all(a["image_id"] in held_ids for a in held["annotations"])
    assert train["categories"] == held["categories"] == coco["categories"]


def test_other_salt_gives_another_split_and_bad_sizes_fail() -> None:
    assert holdout_ids(range(100), 25) != holdout_ids(range(100), 25, salt="tune")
    with pytest.raises(ValueError):
        holdout_ids(range(3), 4)
