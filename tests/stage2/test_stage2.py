"""Stage 2: mmdet configs, Ray Train wrapper (2 CPU workers), checkpoint/resume.

Slow: each test trains an R50 model from scratch for a few iterations on 96 px demo images.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from exits import evaluate
from exits.stage2 import build_stage2_config, register_mmengine_safe_globals, train_stage2
from exits.stage2.driver import METRICS_FILE
from exits.stage2.report_hook import PREDICTIONS_DIR, RayTrainReportHook
from exits.stage2.worker import checkpoint_file

pytestmark = pytest.mark.slow

IMAGE_SIZE = 96  # the session demo set's image side


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The shared local Ray (tests/conftest.py)."""


@pytest.fixture(scope="module")
def pseudo_json(demo_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo train GT written as a pseudo-label json (RLE masks, score 1)."""
    with open(demo_dataset["annotations"]) as f:
        data = json.load(f)
    for ann in data["annotations"]:
        ann["score"] = 1.0
    path = tmp_path_factory.mktemp("pseudo") / "pseudo_coco.json"
    path.write_text(json.dumps(data))
    return str(path)


def _config(model: str, pseudo_json: str, demo: dict, work_dir: str, max_iters: int, **overrides):
    return build_stage2_config(
        model,
        train_json=pseudo_json,
        val_json=demo["val_annotations"],
        images_root=demo["images"],
        work_dir=work_dir,
        max_iters=max_iters,
        dataset="demo",
        image_size=IMAGE_SIZE,
        **overrides,
    )


def _smoke_check_predictions(result, demo: dict, iteration: int) -> None:
    """Smoke check, not an AP test: the val predictions were uploaded for ``iteration`` and
    COCOeval on them agrees with the AP mmdet reported (both 0 when the model predicts
    nothing, likely after a few iterations from scratch; mmdet then reports no AP keys).
    Known AP answers for the evaluator: ``test_coco_metric.py``.
    """
    preds = os.path.join(result.path, PREDICTIONS_DIR, f"val_iter_{iteration}.segm.json")
    ours = evaluate.mask_ap(demo["val_annotations"], preds, iou_types=("segm",))["segm"]["AP"]
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(result.metrics.get("coco/segm_mAP", 0.0), abs=1e-3)  # mmdet rounds


def test_ray_train_mask_rcnn_checkpoints_and_resumes(
    ray_cluster, pseudo_json, demo_dataset, tmp_path
):
    storage_path, name = str(tmp_path / "runs"), "mask_rcnn"
    ckpt_every = {"default_hooks.checkpoint.interval": 2}

    cfg = _config("mask_rcnn_r50", pseudo_json, demo_dataset, str(tmp_path / "w"), 2, **ckpt_every)
    first = train_stage2(cfg, num_workers=2, use_gpu=False, storage_path=storage_path, name=name)
    assert first.metrics["iter"] == 2 and first.metrics["start_iter"] == 0
    with first.checkpoint.as_directory() as d:
        assert os.path.basename(checkpoint_file(d)) == "iter_2.pth"
    _smoke_check_predictions(first, demo_dataset, iteration=2)

    # same storage_path + name: resumes from iter 2 and continues to 4
    cfg = _config("mask_rcnn_r50", pseudo_json, demo_dataset, str(tmp_path / "w"), 4, **ckpt_every)
    second = train_stage2(cfg, num_workers=2, use_gpu=False, storage_path=storage_path, name=name)
    assert second.metrics["start_iter"] == 2 and second.metrics["iter"] == 4
    _smoke_check_predictions(second, demo_dataset, iteration=4)
    with second.checkpoint.as_directory() as d:
        assert os.path.basename(checkpoint_file(d)) == "iter_4.pth"
    with open(os.path.join(second.path, METRICS_FILE)) as f:
        assert json.load(f)["iter"] == 4


@pytest.mark.parametrize("model", ["solov2_r50", "mask2former_r50"])
def test_model_trains_one_iteration_and_checkpoint_loads(
    model, pseudo_json, demo_dataset, tmp_path
):
    from mmengine.runner import Runner

    cfg = _config(model, pseudo_json, demo_dataset, str(tmp_path / "work"), 1)
    runner = Runner.from_cfg(cfg)
    reports = []
    hook = RayTrainReportHook(report_fn=lambda m, c: reports.append((dict(m), c is not None)))
    runner.register_hook(hook)
    runner.train()
    assert runner.iter == 1
    # one report: the iteration-1 checkpoint together with the validation that followed it
    assert len(reports) == 1 and reports[0][1]
    assert reports[0][0]["iter"] == 1 and 0.0 <= reports[0][0].get("coco/segm_mAP", 0.0) <= 1.0

    register_mmengine_safe_globals()
    ckpt = torch.load(
        os.path.join(cfg.work_dir, "iter_1.pth"), weights_only=True, map_location="cpu"
    )
    assert ckpt["meta"]["iter"] == 1 and "message_hub" in ckpt


def test_configs_set_classes_and_small_profile(pseudo_json, demo_dataset, tmp_path):
    cfg = _config("mask2former_r50", pseudo_json, demo_dataset, str(tmp_path), 3)
    num_classes = len(demo_dataset["categories"])
    assert cfg.model.panoptic_head.num_things_classes == num_classes
    assert len(cfg.model.panoptic_head.loss_cls.class_weight) == num_classes + 1
    assert cfg.model.data_preprocessor.batch_augments[0]["size"] == (IMAGE_SIZE, IMAGE_SIZE)
    assert cfg.model.backbone.init_cfg is None
    assert cfg.train_cfg == {"type": "IterBasedTrainLoop", "max_iters": 3, "val_interval": 3}
    # mmdet 1x decays at epochs 8 and 11 of 12: iterations 8 and 11 of 12
    twelve = _config("mask_rcnn_r50", pseudo_json, demo_dataset, str(tmp_path), 12)
    assert [s["type"] for s in twelve.param_scheduler] == ["LinearLR", "MultiStepLR"]
    assert twelve.param_scheduler[1]["milestones"] == [8, 11]
    assert twelve.model.train_cfg.rcnn.sampler.num == 32  # cpu_small: <= 4 objects per image
    # the saved config predicts at the trained/validated scale (mmdet's inference_detector and
    # tools/test.py read test_dataloader), not the shipped 1333x800
    for c in (cfg, twelve):
        resize = [t for t in c.test_dataloader.dataset.pipeline if t["type"] == "Resize"]
        assert [t["scale"] for t in resize] == [(IMAGE_SIZE, IMAGE_SIZE)]
        assert c.test_dataloader.dataset.pipeline == c.val_dataloader.dataset.pipeline
        assert c.test_dataloader.num_workers == 0
    assert cfg.train_dataloader.dataset.ann_file == os.path.abspath(pseudo_json)
    assert cfg.val_evaluator.ann_file == os.path.abspath(demo_dataset["val_annotations"])

    full = build_stage2_config(
        "mask_rcnn_r50", pseudo_json, demo_dataset["val_annotations"], demo_dataset["images"],
        str(tmp_path), profile="full", dataset="demo",
    )  # fmt: skip
    assert full.train_cfg.type == "EpochBasedTrainLoop" and full.train_cfg.max_epochs == 12
    assert full.model.roi_head.mask_head.num_classes == num_classes
    assert full.model.backbone.init_cfg.checkpoint == "torchvision://resnet50"  # as shipped
    assert full.train_dataloader.dataset.metainfo["classes"] == tuple(
        c["name"] for c in demo_dataset["categories"]
    )
    # issue 13 item 16: mmdet decodes the stored pixel grid (EXIF ignored), as labelling does
    for built in (cfg, full):
        loads = [s for k in ("train_dataloader", "val_dataloader", "test_dataloader")
                 for s in built[k].dataset.pipeline if s["type"] == "LoadImageFromFile"]  # fmt: skip
        assert len(loads) == 3 and all(s["color_type"] == "color_ignore_orientation" for s in loads)


@pytest.mark.integration
def test_annotations_on_s3_are_localised(s3_bucket, pseudo_json, demo_dataset, tmp_path):
    from exits import storage
    from exits.stage2.worker import localize_inputs

    train_uri = f"{s3_bucket}/ann/pseudo.json"
    val_uri = f"{s3_bucket}/ann/val.json"
    for src, uri in ((pseudo_json, train_uri), (demo_dataset["val_annotations"], val_uri)):
        with open(src, "rb") as f:
            storage.write_bytes(uri, f.read())
    cfg = build_stage2_config(
        "mask_rcnn_r50", train_uri, val_uri, demo_dataset["images"], str(tmp_path), dataset="demo"
    )
    assert cfg.train_dataloader.dataset.ann_file == train_uri  # classes were read from s3
    assert cfg.model.roi_head.bbox_head.num_classes == len(demo_dataset["categories"])

    localize_inputs(cfg, str(tmp_path))
    local_val = cfg.val_evaluator.ann_file
    assert local_val == cfg.val_dataloader.dataset.ann_file and os.path.isfile(local_val)
    with open(local_val) as f, open(demo_dataset["val_annotations"]) as g:
        assert json.load(f) == json.load(g)
    with pytest.raises(ValueError, match="local or shared"):
        build_stage2_config("mask_rcnn_r50", train_uri, val_uri, f"{s3_bucket}/img", str(tmp_path))


def _as_lvis(coco_json: str, out: str, split: str) -> str:
    """The demo json in LVIS v1 form: coco_url paths, category frequency, verified negatives."""
    with open(coco_json) as f:
        data = json.load(f)
    for im in data["images"]:
        im["coco_url"] = f"http://images.cocodataset.org/{split}/{im['file_name']}"
        im["neg_category_ids"], im["not_exhaustive_category_ids"] = [], []
    for cat in data["categories"]:
        cat["frequency"] = "f"
    with open(out, "w") as f:
        json.dump(data, f)
    return out


def test_lvis_config_loads_lvis_v1_data(demo_dataset, tmp_path):
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules

    register_all_modules()
    root = tmp_path / "lvis"
    root.mkdir()
    for split in ("train2017", "val2017"):  # LVIS v1 paths: <root>/<coco split>/<file>
        os.symlink(demo_dataset["images"], root / split)
    train = _as_lvis(demo_dataset["annotations"], str(tmp_path / "train.json"), "train2017")
    val = _as_lvis(demo_dataset["val_annotations"], str(tmp_path / "val.json"), "val2017")
    cfg = build_stage2_config(
        "mask_rcnn_r50", train, val, str(root), str(tmp_path / "work"), max_iters=1,
        dataset="lvis", image_size=IMAGE_SIZE,
    )  # fmt: skip
    assert cfg.train_dataloader.dataset.type == "LVISV1Dataset"
    assert cfg.val_evaluator.type == "LVISMetric"
    ds = DATASETS.build(cfg.train_dataloader.dataset)
    with open(demo_dataset["annotations"]) as f:
        n_train = len(json.load(f)["images"])
    assert len(ds) == n_train
    sample = ds[0]["data_samples"]
    assert sample.img_path.startswith(str(root / "train2017"))
    assert len(sample.gt_instances.masks) == len(sample.gt_instances.labels) > 0
