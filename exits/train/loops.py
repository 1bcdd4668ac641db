"""Ray Train ``train_loop_per_worker`` functions for stage 1a (warm-up) and 1b (generator).

Both loops: each worker reads its shard of the instance table a window of rows at a time
(``ShardedInstances``: DistributedSampler's order, never the whole table), crops are
cut by DataLoader worker processes in parallel with the model step, the model is wrapped by
``ray.train.torch.prepare_model`` (DDP: gloo on CPU, nccl on GPU), AdamW with linear warm-up +
cosine decay, bf16 autocast on GPU. Every ``checkpoint_every`` steps rank 0 writes a checkpoint
(weights + optimiser + scheduler + step + metric history + a self-describing model.pt) through
``ray.train.report``; a restarted worker group (failure, or a re-submitted run with the same
``RunConfig(storage_path, name)``) resumes from ``ray.train.get_checkpoint()`` at the same step.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from exits import storage
from exits.checkpoints import checkpoint_bytes
from exits.config import CropConfig, LossConfig, ModelConfig, RetrievalConfig, TrainConfig
from exits.method.crf import build_crf
from exits.model.generator import (
    build_generator,
    build_similarity_extractor,
    ema_update,
    make_teacher,
    shares_frozen_encoder,
    shares_frozen_prefix,
)
from exits.progress import Progress, emit
from exits.train.data import CropSpec, ShardedInstances
from exits.train.feature_cache import (
    cache_limit,
    cached_generator_loss,
    check_token_cache,
    encode_views,
    model_crop_cache_bytes,
    node_memory_bytes,
    shard_indices,
    view_batches,
)
from exits.train.steps import generator_loss, to_device, warmup_loss

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
STAGE_TAGS = {"warmup": "1a", "generator": "1b"}  # how progress lines name the stage


def _model_kwargs(model_cfg: ModelConfig, crop: CropConfig) -> dict:
    kw: dict[str, Any] = {"img_size": crop.size}
    if model_cfg.trainable_blocks != -1:
        kw["trainable_blocks"] = model_cfg.trainable_blocks
    if model_cfg.encoder_checkpoint:
        kw["encoder_checkpoint"] = model_cfg.encoder_checkpoint
    return kw


def param_groups(model: nn.Module, lr: float, encoder_lr_scale: float) -> list[dict]:
    """AdamW groups: trainable encoder blocks at ``lr * encoder_lr_scale`` (fine-tuning
    pretrained blocks), everything else (decoder) at ``lr``; frozen parameters left out."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    ids = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": lr}]
    if encoder:
        groups.append({"params": encoder, "lr": lr * encoder_lr_scale})
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to 0, stepped once per optimiser step.

    Multiplier of the base lr at step t: (t + 1) / warmup for t < warmup, then
    0.5·(1 + cos(π·(t − warmup) / (total − warmup))), 0 at ``total`` (torchvision's recipe).
    """
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0)
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1 / warmup, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def _loader(
    dataset: ShardedInstances,
    tcfg: TrainConfig,
    rank: int,
    world: int,
    epoch: int,
    skip_batches: int,
    loader_workers: int,
) -> Iterator[dict]:
    """This rank's batches of ``epoch`` from batch ``skip_batches`` on (the resume point)."""
    return dataset.epoch_batches(rank, world, epoch, tcfg.batch_size, skip_batches, loader_workers)


def _encode_views(teacher, extractor, dataset, tcfg: TrainConfig, rcfg: RetrievalConfig,
                  lcfg: LossConfig, device, shared: bool, rank: int, world: int,
                  workers_on_node: int = 1) -> dict:  # fmt: skip
    """This worker's shard encoded under ``tcfg.cache_views`` views (feature_cache), with a
    progress line per view from rank 0; refused before any row is read when the cache would
    exceed its limit (``workers_on_node``: the workers sharing this node's memory), or when
    the teacher's encoder has no frozen part to cache."""
    encoder = getattr(teacher, "module", teacher).encoder
    if not encoder.cacheable:
        raise ValueError(
            "generator.cache_views needs a frozen encoder part (0 <= model.trainable_blocks"
            f" < {encoder.depth}), got {encoder.trainable_blocks}"
        )
    rows = np.asarray(shard_indices(len(dataset), rank, world), dtype=np.int64)
    limit, source = cache_limit(tcfg.cache_max_gb, node_memory_bytes(), workers_on_node)
    crop_bytes = model_crop_cache_bytes(teacher, lcfg.objective == "exits")
    check_token_cache(tcfg.cache_views, len(rows), crop_bytes, limit, source)
    part = dataset.crops(rows)
    indices = list(range(len(part)))
    progress = Progress(STAGE_TAGS["generator"], tcfg.cache_views, unit="view", rate_unit="views/s")

    def on_view(v: int) -> None:
        if rank == 0:
            emit(progress.update(v + 1, {"caching tokens,": f"{len(indices)} crops per view"},
                                 force=True))  # fmt: skip

    return encode_views(teacher, extractor, part, indices, tcfg.cache_views, rcfg, lcfg,
                        tcfg.batch_size, device, shared=shared, on_view=on_view)  # fmt: skip


def export_bytes(model: nn.Module, teacher: nn.Module | None, builder: str, kwargs: dict,
                 step: int, final: bool) -> bytes:  # fmt: skip
    """The stage's self-describing ``model.pt`` (``exits.checkpoints``): the EMA teacher of 1b
    (kind "generator") or the warming-up extractor of 1a (kind "extractor", with its attention
    block among the builder arguments)."""
    bkw = dict(kwargs)
    if teacher is None:
        bkw["attention_block"] = model.attention_block
        return checkpoint_bytes(model, builder, "extractor", bkw, {"step": step, "final": final})
    return checkpoint_bytes(teacher, builder, "generator", bkw, {"step": step, "final": final})


def _maybe_inject_fault(step: int, tcfg: TrainConfig, marker_dir: str | None, rank: int) -> None:
    """Fault injection for tests: the first time ``step`` hits ``fail_at_step``, rank 0 dies."""
    if tcfg.fail_at_step < 0 or step != tcfg.fail_at_step or rank != 0 or not marker_dir:
        return
    marker = storage.join(marker_dir, f"fault-injected-step-{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "1")
    os._exit(17)  # hard worker death, as a lost node would look


@dataclass
class StepParts:
    """What one stage-1 optimiser step touches, built once per run (a Ray Train worker or the
    single-process runner ``exits.train.local``)."""

    stage: str  # "warmup" (1a) | "generator" (1b)
    model: nn.Module  # the student (1b) / the extractor warming up (1a): the EMA's source
    forward: nn.Module  # what runs the forward: ``model``, DDP-wrapped on > 1 worker
    teacher: nn.Module | None  # 1b: the EMA teacher
    extractor: nn.Module | None  # 1b: the frozen similarity extractor, if the source needs one
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rcfg: RetrievalConfig
    lcfg: LossConfig
    crf_fn: Any  # exits.method.crf.build_crf(...) (1b), None (1a)
    device: torch.device
    amp: bool  # bf16 autocast (CUDA only)
    gen: torch.Generator  # the student augmentation's draws
    shared: bool  # the teacher's pass also yields the extractor's tokens and attention
    ema_momentum: float


def train_step(parts: StepParts, batch: dict, cached: bool = False) -> dict:
    """One optimiser step, the body of every stage-1 loop: batch -> objective (1a: Eq. 1
    [+ pairwise]; 1b: Eq. 10 or box-only) under bf16 autocast when ``parts.amp`` -> backward
    -> AdamW step -> lr-schedule step -> EMA teacher update (1b).

    Args:
        batch: a collated ``CropDataset`` batch (image (B, 3, S, S) uint8, ...) on any device,
            or, with ``cached``, a ``view_batches`` batch of the token cache.
    Returns:
        the objective's logs (python floats, ``loss`` among them).
    """
    p = parts
    with torch.autocast(device_type=p.device.type, dtype=torch.bfloat16, enabled=p.amp):
        if cached:
            loss, logs = cached_generator_loss(p.forward, p.teacher, batch, p.rcfg, p.lcfg,
                                               p.crf_fn, p.device)  # fmt: skip
        elif p.stage == "warmup":
            loss, logs = warmup_loss(p.forward, to_device(batch, p.device), p.lcfg)
        else:
            loss, logs = generator_loss(p.forward, p.teacher, p.extractor, to_device(batch, p.device),
                                        p.rcfg, p.lcfg, p.crf_fn, p.gen, p.shared)  # fmt: skip
    p.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    p.optimizer.step()
    p.scheduler.step()
    if p.teacher is not None:
        ema_update(p.teacher, p.model, p.ema_momentum)
    return logs


def train_loop_per_worker(config: dict) -> None:
    """Shared loop; ``config["stage"]`` is "warmup" (1a) or "generator" (1b)."""
    import ray.train
    import ray.train.torch

    stage = config["stage"]
    tcfg = TrainConfig(**config["train"])
    crop = CropConfig(**config["crop"])
    mcfg = ModelConfig(**config["model"])
    rcfg = RetrievalConfig(**config["retrieval"])
    lcfg = LossConfig(**config["loss"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # logical GPUs (fake-GPU clusters): Ray assigned a GPU id, but torch runs on CPU
    device = torch.device("cpu") if tcfg.logical_gpus else ray.train.torch.get_device()
    torch.manual_seed(tcfg.seed + rank)

    kwargs = _model_kwargs(mcfg, crop)
    if stage == "warmup":
        model = build_similarity_extractor(
            mcfg.generator, attention_block=mcfg.attention_block, freeze=False, **kwargs
        )
        model.train()
        teacher, extractor = None, None
    else:
        model = build_generator(mcfg.generator, **kwargs)
        teacher = make_teacher(model).to(device)
        extractor = None
        if config.get("extractor_checkpoint"):
            from exits.checkpoints import load_model

            extractor, _ = load_model(config["extractor_checkpoint"], device)
            extractor.freeze()
    model.to(device)

    spec = CropSpec(
        size=crop.size,
        train=True,
        mean_enlarge=crop.train_mean_enlarge,
        max_enlarge=crop.train_max_enlarge,
    )
    dataset = ShardedInstances(config["instances"], config["images"], spec, seed=tcfg.seed)
    steps_per_epoch = max(1, len(dataset) // (tcfg.batch_size * world))
    total = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps > 0:
        total = min(total, tcfg.max_steps)
    lr = tcfg.lr * (world * tcfg.batch_size if tcfg.scale_lr else 1)
    optimizer = torch.optim.AdamW(
        param_groups(model, lr, tcfg.encoder_lr_scale), lr=lr, weight_decay=tcfg.weight_decay
    )
    scheduler = warmup_cosine(optimizer, tcfg.warmup_steps, total)

    step, history, resumed_from = 0, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        step, history = int(state["step"]), list(state["history"])
        resumed_from = list(state.get("resumed_from", [])) + [step]
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    crf_fn = build_crf(lcfg.crf, n_iters=lcfg.crf_iters) if stage == "generator" else None
    # the extractor's pass can reuse the teacher's: its whole frozen encoder (uncached loop) or
    # the frozen prefix whose output the token cache holds
    caching = stage == "generator" and tcfg.cache_views > 0
    sharing = shares_frozen_prefix if caching else shares_frozen_encoder
    shared = stage == "generator" and extractor is not None and sharing(teacher, extractor)
    amp = tcfg.amp and device.type == "cuda"
    gen = torch.Generator().manual_seed(tcfg.seed * 1000 + rank)
    loader_workers = int(config.get("loader_workers", 1))

    def save_and_report(metrics: dict, final: bool = False) -> None:
        checkpoint = None
        tmp = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix=f"exits-{stage}-")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "step": step, "history": history, "resumed_from": resumed_from}  # fmt: skip
            if teacher is not None:
                state["teacher"] = teacher.state_dict()
            torch.save(state, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
                f.write(export_bytes(model, teacher, mcfg.generator, kwargs, step, final))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": step, "final": final}, checkpoint=checkpoint)

    cache = None
    if caching:
        cache = _encode_views(teacher, extractor, dataset, tcfg, rcfg, lcfg, device, shared,
                              rank, world, ctx.get_local_world_size())  # fmt: skip
    parts = StepParts(stage, model, ddp_model, teacher, extractor, optimizer, scheduler, rcfg, lcfg,
                      crf_fn, device, amp, gen, shared, tcfg.ema_momentum)  # fmt: skip
    t_last, n_last, last_loss = time.time(), 0, float("nan")
    epoch = step // steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    progress = Progress(STAGE_TAGS[stage], total, start=step)  # rank 0 prints it
    while step < total:
        if cache is not None:
            loader = view_batches(cache, epoch, tcfg.cache_views, tcfg.batch_size,
                                  steps_per_epoch, step % steps_per_epoch, tcfg.seed + rank)  # fmt: skip
        else:
            loader = _loader(
                dataset, tcfg, rank, world, epoch, step % steps_per_epoch, loader_workers
            )
        for batch in loader:
            if step >= total:
                break
            _maybe_inject_fault(step, tcfg, config.get("marker_dir"), rank)
            logs = train_step(parts, batch, cached=cache is not None)
            step += 1
            last_loss = logs["loss"]
            n_last += batch["image"].shape[0] * world
            if rank == 0:
                now = time.time()
                logs.update(
                    step=step,
                    epoch=epoch,
                    lr=scheduler.get_last_lr()[0],
                    samples_per_s=n_last / max(now - t_last, 1e-9),
                )
                history.append(logs)
                t_last, n_last = now, 0
                line = progress.update(
                    step, {"epoch": f"{epoch + 1}/{epochs}"}, {"loss": logs["loss"]}
                )
                if line:
                    emit(line)
            if step % tcfg.checkpoint_every == 0 and step < total:
                save_and_report({"loss": logs["loss"]})
        epoch += 1
    save_and_report({"loss": last_loss}, final=True)
    if rank == 0:
        emit(progress.summary({"loss": last_loss}))


def loop_config(stage: str, instances: str, images: str, crop: CropConfig, model: ModelConfig, retrieval: RetrievalConfig,
                loss: LossConfig, train: TrainConfig, extractor_checkpoint: str | None = None,
                marker_dir: str | None = None, loader_workers: int = 1) -> dict:  # fmt: skip
    """The plain-dict config handed to every worker."""
    return {
        "stage": stage,
        "instances": instances,
        "images": images,
        "crop": asdict(crop),
        "model": asdict(model),
        "retrieval": asdict(retrieval),
        "loss": asdict(loss),
        "train": asdict(train),
        "extractor_checkpoint": extractor_checkpoint,
        "marker_dir": marker_dir,
        "loader_workers": loader_workers,
    }
