"""mmdetection 3.3 configs for stage 2 (instance segmentation trained on pseudo masks).

Each model is a YAML file in ``configs/stage2/`` naming one of mmdet's shipped configs
(``mmdet::…``, resolved with :func:`mmengine.hub.get_config` inside the installed mmdet
package) plus the keys to change. :func:`build_stage2_config` loads it and points it at
the data:

* train ``ann_file`` = the pseudo-label COCO json, val/test ``ann_file`` = the GT json;
* ``metainfo.classes`` = the category names of the training json (in json order), and the
  model's class-count keys (``num_classes_keys`` in the YAML) set to their number;
* dataset type / metric from :data:`DATASETS` (COCO, LVIS v1 with the LVIS metric, demo);
* profile ``full`` = mmdet's schedule as shipped; ``cpu_small`` = small images, a few
  iterations with an ``IterBasedTrainLoop``, validation at the end, no pretrained download.

Annotation jsons may be local paths or ``s3://`` URIs (the Ray wrapper downloads them on
each worker); images must be on a local or shared filesystem reachable by every worker. Images are read from ``images_root``/``file_name``
(COCO, demo) or ``images_root``/``train2017|val2017``/… from ``coco_url`` (LVIS v1).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mmengine.config import Config, ConfigDict

from exits import storage

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "stage2"
PROFILES = ("full", "cpu_small")

# dataset name → (mmdet dataset type, mmdet metric type)
DATASETS: dict[str, tuple[str, str]] = {
    "coco": ("CocoDataset", "CocoMetric"),
    "demo": ("CocoDataset", "CocoMetric"),
    "lvis": ("LVISV1Dataset", "LVISMetric"),
}
# cpu_small: linear warm-up from this fraction of the lr
WARMUP_START_FACTOR = 1e-3
# cpu_small: lr x0.1 at these fractions of max_iters (mmdet's 1x: epochs 8 and 11 of 12)
LR_DECAY_AT = (8 / 12, 11 / 12)
LR_DECAY_GAMMA = 0.1
# cpu_small: checkpoints kept on the worker's local disk (the run directory keeps Ray's copies)
MAX_KEEP_LOCAL_CKPTS = 2
TEST_META_KEYS = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")


@dataclass
class Stage2ModelSpec:
    """One ``configs/stage2/<name>.yaml``: which mmdet config and what to change in it."""

    name: str
    base_config: str  # "mmdet::<dir>/<file>.py"
    num_classes_keys: list[str]  # dotted keys set to the number of classes
    find_unused_parameters: bool = False  # DDP flag for this architecture
    class_weight_key: str | None = None  # per-class loss weights (+1 no-object entry)
    no_object_weight: float = 0.1
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)


def available_models() -> list[str]:
    """Model names with a YAML in :data:`CONFIG_DIR`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_model_spec(model: str) -> Stage2ModelSpec:
    """Parse ``configs/stage2/<model>.yaml`` (or a path to a YAML file)."""
    path = Path(model) if model.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{model}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown stage-2 model {model!r}; available: {available_models()}")
    with open(path) as f:
        return Stage2ModelSpec(**yaml.safe_load(f))


def load_base_config(base_config: str) -> Config:
    """Load a shipped mmdet config: ``mmdet::x/y.py`` from the installed package, or a path."""
    if "::" in base_config:
        from mmengine.hub import get_config

        return get_config(base_config)
    return Config.fromfile(base_config)


def read_categories(ann_json: str) -> list[dict[str, Any]]:
    """Categories of a COCO json (local path or s3:// URI), in file order."""
    return storage.read_json(ann_json)["categories"]


def resolve_uri(uri: str) -> str:
    """Absolute local path, or the ``s3://`` URI unchanged (localised later on each worker)."""
    return uri if storage.is_s3(uri) else os.path.abspath(uri)


# --------------------------------------------------------------------------- pieces
def small_pipelines(image_size: int) -> tuple[list[dict], list[dict]]:
    """(train, test) pipelines for the CPU profile: resize to fit ``image_size``², flip."""
    scale = (image_size, image_size)
    train = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    test = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=TEST_META_KEYS),
    ]
    return train, test


def ignore_exif_orientation(node: Any) -> None:
    """Every ``LoadImageFromFile`` decodes the stored pixel grid, as labelling and the report do
    (``exits.data.images``): mmcv's default ``color`` would apply the EXIF rotation and
    disagree with the masks' size; ``color_ignore_orientation`` (cv2) does not."""
    if isinstance(node, dict):
        if node.get("type") == "LoadImageFromFile":
            node["color_type"], node["imdecode_backend"] = "color_ignore_orientation", "cv2"
        for value in node.values():
            ignore_exif_orientation(value)
    elif isinstance(node, list | tuple):
        for value in node:
            ignore_exif_orientation(value)


def set_num_classes(cfg: Config, spec: Stage2ModelSpec, num_classes: int) -> None:
    """Set every class-count key of the model (and the per-class loss weights)."""
    updates: dict[str, Any] = dict.fromkeys(spec.num_classes_keys, num_classes)
    if spec.class_weight_key:
        updates[spec.class_weight_key] = [1.0] * num_classes + [spec.no_object_weight]
    cfg.merge_from_dict(updates)


def set_batch_pad_size(cfg: Config, image_size: int) -> None:
    """Shrink every ``BatchFixedSizePad`` batch augment (Mask2Former: 1024²) to ``image_size``²."""
    for aug in cfg.model.get("data_preprocessor", {}).get("batch_augments") or []:
        if aug.get("type") == "BatchFixedSizePad":
            aug["size"] = (image_size, image_size)


def set_data(
    cfg: Config,
    dataset: str,
    train_json: str,
    val_json: str,
    images_root: str,
    val_images_root: str,
    classes: tuple[str, ...],
) -> None:
    """Point train at the pseudo-label json and val/test at the GT json; one metric."""
    dataset_type, metric_type = DATASETS[dataset]
    for root in (images_root, val_images_root):
        if storage.is_s3(root):  # mmengine's file backends cannot read s3://
            raise ValueError(f"images must be on a local or shared filesystem, got {root}")
    splits = (
        ("train_dataloader", train_json, images_root),
        ("val_dataloader", val_json, val_images_root),
    )
    for loader, ann_file, root in splits:
        ds = cfg[loader]["dataset"]
        ds.type = dataset_type
        ds.data_root = ""
        ds.ann_file = resolve_uri(ann_file)
        ds.data_prefix = dict(img=os.path.join(os.path.abspath(root), ""))
        ds.metainfo = dict(classes=classes)
    cfg.test_dataloader = copy.deepcopy(cfg.val_dataloader)
    shipped = cfg.val_evaluator if isinstance(cfg.val_evaluator, dict) else cfg.val_evaluator[-1]
    cfg.val_evaluator = dict(
        type=metric_type,
        ann_file=resolve_uri(val_json),
        metric=shipped.get("metric", ["bbox", "segm"]),
        format_only=False,
        # rank 0 gathers results with all_gather_object (works on gloo/CPU too) rather than
        # through a temp dir, which would have to be shared between nodes
        collect_device="gpu",
    )
    cfg.test_evaluator = copy.deepcopy(cfg.val_evaluator)


def apply_cpu_small(cfg: Config, profile: dict[str, Any], max_iters: int) -> None:
    """Small CPU profile: small pipelines, iteration loop, warm-up + step decay, val at the end."""
    image_size = int(profile["image_size"])
    train_pipeline, test_pipeline = small_pipelines(image_size)
    cfg.train_dataloader.dataset.pipeline = train_pipeline
    # test = val: the saved config (mmdet's inference_detector, tools/test.py) must predict at
    # the scale the model was trained and validated at, not the shipped 1333x800
    for loader in ("val_dataloader", "test_dataloader"):
        cfg[loader].dataset.pipeline = copy.deepcopy(test_pipeline)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.train_dataloader.batch_size = int(profile["batch_size"])
    set_batch_pad_size(cfg, image_size)
    warmup = min(int(profile["warmup_iters"]), max_iters)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=WARMUP_START_FACTOR, by_epoch=False, begin=0, end=warmup),
        dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters, gamma=LR_DECAY_GAMMA,
             milestones=[max(1, round(f * max_iters)) for f in LR_DECAY_AT]),
    ]  # fmt: skip
    cfg.default_hooks.checkpoint = dict(
        type="CheckpointHook",
        by_epoch=False,
        interval=min(int(profile["checkpoint_interval"]), max_iters),
        save_last=True,
        max_keep_ckpts=MAX_KEEP_LOCAL_CKPTS,
    )
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=int(profile["log_interval"]))
    cfg.log_processor = dict(
        type="LogProcessor", window_size=int(profile["log_interval"]), by_epoch=False
    )


def set_max_iters(cfg: Config, max_iters: int) -> None:
    """Any profile: train ``max_iters`` iterations, validate at the end, checkpoint by iteration."""
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
    ckpt = cfg.default_hooks.checkpoint
    ckpt.by_epoch = False
    ckpt.interval = min(int(ckpt.get("interval", max_iters)), max_iters)
    cfg.log_processor = dict(type="LogProcessor", window_size=50, by_epoch=False)


# --------------------------------------------------------------------------- entry point
def build_stage2_config(
    model: str,
    train_json: str,
    val_json: str,
    images_root: str,
    work_dir: str,
    profile: str = "cpu_small",
    max_iters: int | None = None,
    *,
    dataset: str = "coco",
    val_images_root: str | None = None,
    image_size: int | None = None,
    seed: int | None = 0,
    **overrides: Any,
) -> Config:
    """mmengine ``Config`` for one stage-2 model trained on a (pseudo-label) COCO json.

    Args:
        model: a name from :func:`available_models` (``mask_rcnn_r50``, ``solov2_r50``,
            ``mask2former_r50``) or a path to a YAML of the same shape.
        train_json: COCO json with the training masks (pseudo labels or GT); path or s3://.
        val_json: GT json for validation/test (COCOeval / LVIS metric); path or s3://.
        images_root: folder that ``file_name`` of the training images is relative to.
        work_dir: mmengine work dir (logs, local checkpoints).
        profile: ``"full"`` (mmdet's schedule as shipped) or ``"cpu_small"``.
        max_iters: train this many iterations (IterBasedTrainLoop, val at the end); for
            ``cpu_small`` replaces the YAML's value. Epoch-based LR milestones of the ``full``
            profile are then not reached.
        dataset: key of :data:`DATASETS` (``coco``, ``lvis``, ``demo``).
        val_images_root: image folder of the val json (default ``images_root``).
        image_size: ``cpu_small`` only: replaces the YAML's ``image_size`` (resize target and
            batch pad size).
        seed: ``randomness.seed`` (None: mmengine draws one).
        **overrides: dotted mmengine keys applied last, e.g. ``{"model.backbone.depth": 18}``.

    Returns:
        The config; the Ray wrapper adds ``launcher`` and the DDP wrapper settings.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    spec = load_model_spec(model)
    prof = copy.deepcopy(spec.profiles.get(profile, {}))
    if image_size is not None:
        prof["image_size"] = int(image_size)
    cfg = load_base_config(spec.base_config)

    classes = tuple(c["name"] for c in read_categories(train_json))
    set_num_classes(cfg, spec, len(classes))
    set_data(
        cfg, dataset, train_json, val_json, images_root, val_images_root or images_root, classes
    )
    if profile == "cpu_small":
        apply_cpu_small(cfg, prof, int(max_iters or prof["max_iters"]))
    elif max_iters:
        set_max_iters(cfg, int(max_iters))
    cfg.auto_scale_lr = dict(
        enable=bool(prof.get("auto_scale_lr", False)),
        base_batch_size=cfg.get("auto_scale_lr", {}).get("base_batch_size", 16),
    )
    cfg.merge_from_dict(prof.get("overrides") or {})
    cfg.merge_from_dict(overrides)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ignore_exif_orientation(cfg.get(loader))
    cfg.work_dir = work_dir
    cfg.find_unused_parameters = spec.find_unused_parameters
    if seed is not None:
        cfg.randomness = dict(seed=int(seed))
    cfg.exits_stage2 = ConfigDict(model=spec.name, profile=profile, dataset=dataset)
    return cfg
