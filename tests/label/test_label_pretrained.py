"""Pseudo-labelling with the pretrained-encoder generator (vit_small_dinov2) stays exactly-once
and resumable: a fault part way, a resume, every instance once in masks or errors."""

from __future__ import annotations

import json
import os

import pytest

from exits.config import CropConfig, LabelConfig
from exits.data.coco import load_instances
from exits.label import InjectedFault, label_instances, read_errors, read_masks, verify_outputs

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SIZE = 56  # a multiple of 14 (4x4 patches): small enough for a CPU test


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(
        address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory) -> str:
    import torch

    from exits.checkpoints import read_checkpoint, save_model
    from exits.model.generator import build_generator

    torch.manual_seed(0)
    kwargs = {"img_size": SIZE, "trainable_blocks": 0}
    path = str(tmp_path_factory.mktemp("ckpt") / "generator.pt")
    save_model(path, build_generator("vit_small_dinov2", **kwargs), "vit_small_dinov2",
               "generator", kwargs)  # fmt: skip
    assert read_checkpoint(path)["builder"] == "vit_small_dinov2"
    return path


def test_pretrained_generator_labels_exactly_once_after_resume(
    ray_local, demo_dataset, pretrained_ckpt, tmp_path
):
    instances, _ = load_instances(
        demo_dataset["annotations"], demo_dataset["images"], check_files=False
    )
    run = str(tmp_path / "run")
    crop = CropConfig(size=SIZE)
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
