"""One commented dataclass per component; YAML from ``configs/`` parsed once at the job boundary.

Load with :func:`load_config` (a dataset name such as ``demo`` / ``coco`` / ``lvis`` / ``voc``,
or a path to a YAML file) plus ``key.sub=value`` overrides from the command line. Library code
receives the small dataclass it needs, never the whole config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass
class DataConfig:
    """Where the dataset lives (local paths or s3:// URIs)."""

    name: str = "demo"
    annotations: str = ""  # train json (COCO / LVIS v1 / VOC-as-COCO)
    images: str = ""  # prefix the train json's file names are relative to
    val_annotations: str = ""  # GT json used for evaluation (stage 2 val, pseudo-label mIoU)
    val_images: str = ""
    # demo only: the synthetic set is generated under <output>/data when annotations is empty
    synthetic_images: int = 96
    synthetic_image_size: int = 128
    synthetic_seed: int = 0
    max_instances: int = 0  # >0: keep only the first N instances (parts in order; quick runs)
    prepare_shard_images: int = 500  # images per prepare shard (one Ray Data task each)
    # >0 and no val_annotations: hold out this many images of the train json for evaluation
    # (deterministic by image id, exits.data.split); the rest is the training set
    holdout_images: int = 0
    holdout_salt: str = (
        "holdout"  # another salt = another split (e.g. "tune" inside the train part)
    )
    # hostile-input limit (exits.data.validate / images): an image whose declared or stored
    # size exceeds this many pixels is an error row, checked before any pixel buffer exists
    max_image_pixels: int = 2**26  # 8192 x 8192
    # hostile-input limit (exits.data.images): an image file larger than this many bytes is an
    # error row at prepare's header check (and wherever a file is read whole), checked from its
    # size before a byte is read. 64 MiB holds any real JPEG/PNG/WebP photo; raise it for
    # uncompressed TIFF/BMP scans (8192^2 RGB: 192 MiB)
    max_image_bytes: int = 64 << 20


@dataclass
class CropConfig:
    """Crops around the extreme-point box (MAL / paper)."""

    size: int = 512  # S: crops are resized to S x S (aspect not kept)
    inference_enlarge: float = 1.3  # fixed enlargement per dimension at inference
    train_mean_enlarge: float = 1.3  # random per-side margin at training, mean ...
    train_max_enlarge: float = 1.6  # ... and max enlargement per dimension


@dataclass
class ModelConfig:
    """Generator / similarity-extractor architecture and weights."""

    generator: str = "vit_base_mae"  # exits.model.generator.GENERATORS key
    encoder_checkpoint: str | None = None  # pretrained ViT (e.g. MAE ViT-B/16) path or URI
    attention_block: int | None = None  # 0-based block for the similarity (None: builder default)
    # encoder blocks that train (last k + final norm): -1 all, 0 frozen encoder (CPU runs)
    trainable_blocks: int = -1


@dataclass
class RetrievalConfig:
    """Point retrieval (Sec. 3.2.2) and the similarity source behind the transition matrix."""

    enabled: bool = True  # False: supervise with the initial points only (paper Table 5, row 2)
    # attention | bilateral | spatial | attention_x_bilateral | tokens | tokens_x_bilateral
    similarity: str = "attention"
    sinkhorn_iters: int = 50
    hops: int = 3  # alpha
    threshold_rule: str = "absolute"  # absolute (paper, scaled by 1024/n) | relative (quantiles)
    tau_fg: float = 1e-3  # paper values for n = 1024 tokens
    tau_bg: float = -1e-4
    fg_quantile: float = 0.8  # relative rule: top / bottom in-box quantiles
    bg_quantile: float = 0.2
    delta: float = 1.0  # inward shift of the extreme points, in patch units
    dropout: float = 0.9  # point dropout rate, resampled every step
    bilateral_theta_pos: float = 1.5  # patch cells
    bilateral_theta_col: float = 10.0  # CIELAB units
    token_temperature: float = 0.05  # tokens sources: exp((cos - 1) / temperature)


@dataclass
class LossConfig:
    """Training objective (Eq. 1, 6-10)."""

    objective: str = "exits"  # exits (point + CRF) | box_only (MAL ablation: MIL + CRF)
    lambda_point: float = 1.0
    lambda_crf: float = 0.5
    lambda_mil: float = 4.0  # MAL's value; the paper leaves it open
    balanced_bce: float = 0.0  # from-scratch switch: class-balanced BCE on labelled points
    crf: str = "torch"  # torch (batched mean-field, GPU) | pydensecrf (exact, CPU)
    crf_iters: int = 5
    warmup_pairwise: float = 0.0  # from-scratch switch: colour-affinity term in the 1a warm-up


@dataclass
class TrainConfig:
    """One Ray Train stage (1a warm-up or 1b generator)."""

    epochs: int = 1
    max_steps: int = 0  # >0 caps the number of optimizer steps
    batch_size: int = 8  # per worker
    lr: float = 1.5e-6  # paper; MAL scales it by GPUs x batch
    scale_lr: bool = True  # multiply lr by world_size * batch_size (MAL)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    ema_momentum: float = 0.996
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    # with use_gpu: request the GPUs from Ray (scheduling, autoscaling) but run torch on CPU
    # (clusters whose GPUs are logical only, e.g. the fake multi-node test cluster)
    logical_gpus: bool = False
    # custom Ray resource each worker asks 0.001 of: pins the workers to the node types that
    # declare it (cloud profiles: train_node, only the gpu_train type of cluster/*.yaml has it)
    node_resource: str = ""
    amp: bool = True  # bf16 autocast on GPU only
    # worker-group restarts (each resumes from the last checkpoint): one spurious restart (Ray
    # 2.60's placement-group cleaner can mistake a live controller for a dead one under load)
    # plus one real fault
    max_failures: int = 2
    checkpoint_every: int = 50  # steps
    # stage 1b with a (partly) frozen encoder (model.trainable_blocks k >= 0): run the frozen
    # part on each crop under this many geometric views once, then train the last k blocks and
    # the decoder on the cached output (train/feature_cache)
    cache_views: int = 0
    # per-worker bound of that cache in GB (1e9 bytes); 0 = half the node's memory shared by
    # the workers on the node. A larger cache is refused before anything is encoded
    cache_max_gb: float = 0.0
    # lr of trainable encoder blocks relative to lr (fine-tuning pretrained blocks)
    encoder_lr_scale: float = 1.0
    seed: int = 0
    fail_at_step: int = -1  # fault injection (tests): a worker exits at this step once


@dataclass
class LabelConfig:
    """Stage 1c: bulk pseudo-labelling on Ray Data."""

    batch_size: int = 32  # crops per model batch
    num_actors: int = 1  # fixed-size actor pool (autoscaling GPU pools can stall, ray#59144)
    gpus_per_actor: float = 0.0  # 1 on GPU clusters
    cpus_per_actor: float = 1.0  # the actor's torch threads = ceil(this) (on CPU)
    cpus_per_task: float = 1.0  # decode/crop and paste tasks; the cores left by the actors
    threshold: float = 0.5  # probability threshold after paste-back
    # masks whose quality score (exits.inference.mask_score, in [0, 1]) is below this are left
    # out of stage 2's COCO json (they stay in label/masks with their score); 0 = off
    min_score: float = 0.0
    use_gpu: bool = False
    logical_gpus: bool = False  # with use_gpu: request gpus_per_actor but run torch on CPU
    # custom resource each decode/paste task asks 0.001 of: keeps them on the node types that
    # declare it (cloud profiles: decode_node), so CPU work never starts a GPU node
    decode_resource: str = ""
    images_per_block: int = 8  # images per CPU decode/crop batch
    shard_images: int = 64  # images per output shard: the commit/resume unit of stage 1c
    # fault injection (tests): the driver stops after K > 0 result batches
    fail_after_batches: int = -1


@dataclass
class Stage2Config:
    """Stage 2: mmdetection instance segmentation under Ray Train."""

    model: str = "solov2_r50"  # mask_rcnn_r50 | solov2_r50 | mask2former_r50
    profile: str = "full"  # full (mmdet schedule) | cpu_small
    max_iters: int = 0  # >0 overrides the schedule (cpu_small)
    num_workers: int = 1
    cpus_per_worker: int = 1  # CPUs reserved per Ray Train worker (its torch threads on CPU;
    # on GPU nodes: room for mmdet's dataloader processes)
    batch_size: int = 0  # images per worker and step (0: the profile's)
    use_gpu: bool = False
    logical_gpus: bool = False  # with use_gpu: request the GPUs, run torch on CPU (gloo)
    node_resource: str = ""  # custom resource each worker asks 0.001 of (as TrainConfig's)
    image_size: int = 0  # cpu_small resize (0: profile default)
    max_failures: int = 2  # worker-group restarts, each resuming (see TrainConfig)


@dataclass
class PipelineConfig:
    """Everything a pipeline run needs; each stage receives only its part."""

    data: DataConfig = field(default_factory=DataConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    warmup: TrainConfig = field(default_factory=TrainConfig)  # stage 1a
    generator: TrainConfig = field(default_factory=TrainConfig)  # stage 1b
    label: LabelConfig = field(default_factory=LabelConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    device: str = "cpu"  # cpu | cuda (GPU switches of all stages default from this)


MAX_BASE_CHAIN = 16  # `base:` files one config may stack


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with anchors and aliases refused: a 472-byte alias bomb expanded
    past 2.6 GB (and a config never needs them: use ``base:``)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise ValueError(
                f"{mark.name}: line {mark.line + 1}: YAML anchors and aliases (&name, *name) are "
                "not allowed in configs; repeat the value or use `base:`"
            )
        return super().compose_node(parent, index)


def _yaml(text: str, name: str = "<override>") -> Any:
    """Parse YAML text without alias expansion; any error is one ``ValueError`` line."""
    loader = _NoAliasLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f"line {where.line + 1}: " if where is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"{name}: {at}not valid YAML: {problem}") from None
    finally:
        loader.dispose()


def _short(value: Any) -> str:
    """repr of a config value cut to a line (error messages never print a huge value)."""
    return reprlib.repr(value)


def _parse_value(text: str) -> Any:
    return _yaml(text)


def _check_type(where: str, hint: Any, value: Any) -> Any:
    """The value to set, or TypeError when it does not fit its field's annotation. Ints pass
    for floats; bools are not ints here; a float field takes a string such as "5e-4", which
    YAML 1.1 (PyYAML) reads as a string, as the float it spells."""
    kinds = typing.get_args(hint) or (hint,)
    if float in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    for t in kinds:
        if t is type(None) and value is None:
            return value
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    raise TypeError(f"config key {where} expects {hint}, got {_short(value)}")


def _merge(obj: Any, data: dict, where: str) -> Any:
    """Recursively apply a dict onto a dataclass instance; unknown keys and values of the
    wrong type fail fast."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in (data or {}).items():
        if key not in names:
            raise KeyError(f"unknown config key {where}{_short(key)}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"config key {where}{key} expects a mapping")
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _check_type(f"{where}{key}", hints[key], value))
    return obj


def resolve_config_path(name_or_path: str) -> str:
    if os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(CONFIG_DIR, "datasets", f"{name_or_path}.yaml")
    if not os.path.exists(path):
        known = sorted(
            f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, "datasets")) if f.endswith(".yaml")
        )
        raise FileNotFoundError(f"no dataset config {name_or_path!r}; known: {known}")
    return path


def load_yaml(path: str, _chain: tuple[str, ...] = ()) -> dict:
    """Load a YAML config; ``base: other.yaml`` (relative to the file) is merged underneath.

    Anchors/aliases, a top level that is not a mapping, a ``base:`` that is not a file name and a
    ``base:`` chain that loops or is longer than :data:`MAX_BASE_CHAIN` are one-line
    ``ValueError``s."""
    real = os.path.realpath(path)
    if real in _chain:
        loop = " -> ".join(os.path.basename(p) for p in (*_chain, real))
        raise ValueError(f"{path}: `base:` chain loops: {loop}")
    if len(_chain) >= MAX_BASE_CHAIN:
        raise ValueError(f"{path}: `base:` chain longer than {MAX_BASE_CHAIN} files")
    with open(path, encoding="utf-8") as f:
        data = _yaml(f.read(), path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{path}: `base:` must be a file name, got {_short(base)}")
    if base:
        merged = load_yaml(os.path.join(os.path.dirname(path), base), (*_chain, real))
        return _deep_update(merged, data)
    return data


def _deep_update(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def apply_overrides(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars)."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = _parse_value(text)
        _merge(cfg, nested, "")
    return cfg


DATA_PATH_FIELDS = ("annotations", "images", "val_annotations", "val_images")


def _absolute_data_paths(data: DataConfig) -> None:
    """Relative local data paths are relative to the directory the job starts in; Ray workers
    run elsewhere, so resolve them once here (URIs such as s3://… are left alone)."""
    for name in DATA_PATH_FIELDS:
        value = getattr(data, name)
        if value and "://" not in value and not os.path.isabs(value):
            setattr(data, name, os.path.abspath(value))


# (section, field) -> (low, high, low inclusive): every numeric value is range-checked at load
_RANGES: dict[tuple[str, str], tuple[float | None, float | None, bool]] = {
    ("data", "max_instances"): (0, None, True),
    ("data", "holdout_images"): (0, None, True),
    ("data", "synthetic_images"): (1, None, True),
    ("data", "synthetic_image_size"): (16, None, True),
    ("data", "max_image_pixels"): (1, None, True),
    ("data", "max_image_bytes"): (1, None, True),
    ("crop", "size"): (1, None, True),
    ("crop", "inference_enlarge"): (1.0, None, True),
    ("crop", "train_mean_enlarge"): (1.0, None, True),
    ("crop", "train_max_enlarge"): (1.0, None, True),
    ("model", "trainable_blocks"): (-1, None, True),
    ("retrieval", "sinkhorn_iters"): (1, None, True),
    ("retrieval", "hops"): (1, None, True),
    ("retrieval", "fg_quantile"): (0.0, 1.0, True),
    ("retrieval", "bg_quantile"): (0.0, 1.0, True),
    ("retrieval", "delta"): (0.0, None, True),
    ("retrieval", "dropout"): (0.0, 1.0, True),
    ("retrieval", "bilateral_theta_pos"): (0.0, None, False),
    ("retrieval", "bilateral_theta_col"): (0.0, None, False),
    ("retrieval", "token_temperature"): (0.0, None, False),
    ("loss", "lambda_point"): (0.0, None, True),
    ("loss", "lambda_crf"): (0.0, None, True),
    ("loss", "lambda_mil"): (0.0, None, True),
    ("loss", "balanced_bce"): (0.0, None, True),
    ("loss", "crf_iters"): (0, None, True),
    ("loss", "warmup_pairwise"): (0.0, None, True),
    ("train", "epochs"): (0, None, True),
    ("train", "max_steps"): (0, None, True),
    ("train", "batch_size"): (1, None, True),
    ("train", "lr"): (0.0, None, False),
    ("train", "weight_decay"): (0.0, None, True),
    ("train", "warmup_steps"): (0, None, True),
    ("train", "ema_momentum"): (0.0, 1.0, True),
    ("train", "num_workers"): (1, None, True),
    ("train", "max_failures"): (-1, None, True),
    ("train", "checkpoint_every"): (1, None, True),
    ("train", "cache_views"): (0, None, True),
    ("train", "cache_max_gb"): (0.0, None, True),
    ("train", "encoder_lr_scale"): (0.0, None, True),
    ("label", "batch_size"): (1, None, True),
    ("label", "num_actors"): (1, None, True),
    ("label", "gpus_per_actor"): (0.0, None, True),
    ("label", "cpus_per_actor"): (0.0, None, True),
    ("label", "threshold"): (0.0, 1.0, False),
    ("label", "min_score"): (0.0, 1.0, True),
    ("label", "images_per_block"): (1, None, True),
    ("label", "shard_images"): (1, None, True),
    ("stage2", "max_iters"): (0, None, True),
    ("stage2", "num_workers"): (1, None, True),
    ("stage2", "cpus_per_worker"): (1, None, True),
    ("stage2", "batch_size"): (0, None, True),
    ("stage2", "image_size"): (0, None, True),
}
# string switches with a closed set of values (the modules that read them say what each does)
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("retrieval", "similarity"): (
        "attention",
        "bilateral",
        "spatial",
        "attention_x_bilateral",
        "tokens",
        "tokens_x_bilateral",
    ),  # fmt: skip
    ("retrieval", "threshold_rule"): ("absolute", "relative"),
    ("loss", "objective"): ("exits", "box_only"),
    ("loss", "crf"): ("torch", "pydensecrf"),
    ("stage2", "profile"): ("full", "cpu_small"),
}
DEVICES = ("cpu", "cuda")


def validate_config(cfg: PipelineConfig) -> PipelineConfig:
    """Type- and range-check every value (fail fast: before Ray starts or anything is written).

    Raises:
        ValueError: naming the key, its value and the allowed range or choices.
    """
    if cfg.device not in DEVICES:
        raise ValueError(f"config key device must be one of {DEVICES}, got {cfg.device!r}")
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(part):
            continue
        kind = "train" if isinstance(part, TrainConfig) else section.name
        hints = typing.get_type_hints(type(part))
        for f in dataclasses.fields(part):
            key, value = f"{section.name}.{f.name}", getattr(part, f.name)
            _check_type(key, hints[f.name], value)  # a value set in code, not only via YAML
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config key {key} must be finite, got {value!r}")
            low, high, closed = _RANGES.get((kind, f.name), (None, None, True))
            if isinstance(value, int | float) and not isinstance(value, bool):
                below = low is not None and (value < low if closed else value <= low)
                above = high is not None and (value > high if closed else value >= high)
                if below or above:
                    lo, hi = ("[" if closed else "("), ("]" if closed else ")")
                    raise ValueError(
                        f"config key {key} = {value!r} is outside {lo}{low}, "
                        f"{high if high is not None else 'inf'}{hi}"
                    )
            choices = _CHOICES.get((kind, f.name))
            if choices and value not in choices:
                raise ValueError(f"config key {key} must be one of {choices}, got {value!r}")
    if cfg.crop.train_max_enlarge < cfg.crop.train_mean_enlarge:
        raise ValueError("config key crop.train_max_enlarge must be >= crop.train_mean_enlarge")
    if cfg.generator.cache_views > 0 and cfg.model.trainable_blocks < 0:
        raise ValueError(
            f"config key generator.cache_views = {cfg.generator.cache_views} needs a frozen "
            f"encoder part (model.trainable_blocks >= 0), got {cfg.model.trainable_blocks}"
        )
    model = cfg.stage2.model
    if not model.endswith((".yaml", ".yml")) and not os.path.isfile(
        os.path.join(CONFIG_DIR, "stage2", f"{model}.yaml")
    ):
        known = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, "stage2")))
        raise ValueError(f"config key stage2.model: unknown model {model!r}; known: {known}")
    from exits.model.generator import GENERATORS  # the registry (imports torch, once)

    if cfg.model.generator not in GENERATORS:
        raise ValueError(
            f"config key model.generator: unknown {cfg.model.generator!r}; known: {sorted(GENERATORS)}"
        )
    return cfg


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from a dataset name or YAML path (None: the dataclass
    defaults) plus overrides; ``device: cuda`` switches every stage to GPUs here, once."""
    cfg = PipelineConfig()
    if name_or_path is not None:
        cfg = _merge(cfg, load_yaml(resolve_config_path(name_or_path)), "")
    cfg = apply_overrides(cfg, overrides or [])
    _absolute_data_paths(cfg.data)
    if cfg.device == "cuda":
        for part in (cfg.warmup, cfg.generator, cfg.label, cfg.stage2):
            part.use_gpu = True
        if cfg.label.gpus_per_actor == 0:
            cfg.label.gpus_per_actor = 1.0
    return validate_config(cfg)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
