"""Stage 1a / 1b in this process on one device, without Ray (the GPU check on a bare image).

The same plain-dict config as the Ray Train loop (``loops.loop_config``), the same builders,
data, AdamW groups, warm-up + cosine schedule, token cache, and the same per-step body
(``loops.train_step``). Left out is what only a Ray Train run has: several workers (DDP),
checkpoints through ``ray.train.report``, resume and fault injection. The batch is the one
device's: run a profile of W workers x B per worker as one worker x (W * B) to keep its step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from exits import storage
from exits.config import CropConfig, LossConfig, ModelConfig, RetrievalConfig, TrainConfig
from exits.method.crf import build_crf
from exits.model.generator import (
    build_generator,
    build_similarity_extractor,
    make_teacher,
    shares_frozen_encoder,
    shares_frozen_prefix,
)
from exits.progress import Progress, emit
from exits.train.data import CropSpec, ShardedInstances
from exits.train.feature_cache import view_batches
from exits.train.loops import (
    MODEL_FILE,
    STAGE_TAGS,
    StepParts,
    _encode_views,
    _loader,
    _model_kwargs,
    export_bytes,
    param_groups,
    train_step,
    warmup_cosine,
)


@dataclass
class LocalResult:
    """What a local run leaves: the exported model (the EMA teacher of 1b, the warmed-up
    extractor of 1a; eval mode, on the run's device), its self-describing checkpoint bytes
    (``exits.checkpoints``; ``model_uri`` when written) and the per-step history."""

    model: nn.Module
    checkpoint: bytes
    steps: int
    history: list[dict] = field(default_factory=list)
    model_uri: str | None = None
    stopped_early: bool = False  # ``max_seconds`` ran out before the last step


def fit_local(
    config: dict,
    device: str | torch.device,
    out: str | None = None,
    interval_s: float | None = None,
    max_seconds: float | None = None,
) -> LocalResult:
    """Run stage ``config["stage"]`` ("warmup" = 1a, "generator" = 1b) to its end on ``device``.

    Args:
        config: ``loops.loop_config(...)``'s dict; ``train.num_workers`` is ignored (one
            process), ``train.use_gpu`` too (``device`` decides).
        out: a folder (local or s3) to write ``model.pt`` into, as the Ray run publishes it.
        interval_s: seconds between progress lines (default: ``exits.progress.every_s``).
        max_seconds: stop after the step that passes this many seconds of the loop (a time
            box: the schedule is not finished then; ``LocalResult.stopped_early`` says so).
    Returns:
        LocalResult; each history row holds the objective's logs plus ``step``, ``epoch``,
        ``lr``, ``step_s`` (``train_step`` alone: the logs' floats synchronise the device) and
        ``samples_per_s`` (batch over the wall time since the previous step, data included).
    """
    device = torch.device(device)
    stage = config["stage"]
    tcfg, crop = TrainConfig(**config["train"]), CropConfig(**config["crop"])
    mcfg, rcfg = ModelConfig(**config["model"]), RetrievalConfig(**config["retrieval"])
    lcfg = LossConfig(**config["loss"])
    torch.manual_seed(tcfg.seed)  # rank 0's seed in the Ray loop

    kwargs = _model_kwargs(mcfg, crop)
    teacher, extractor = None, None
    if stage == "warmup":
        model = build_similarity_extractor(
            mcfg.generator, attention_block=mcfg.attention_block, freeze=False, **kwargs
        ).train()
    else:
        model = build_generator(mcfg.generator, **kwargs)
        teacher = make_teacher(model).to(device)
        if config.get("extractor_checkpoint"):
            from exits.checkpoints import load_model

            extractor, _ = load_model(config["extractor_checkpoint"], device)
            extractor.freeze()
    model.to(device)

    spec = CropSpec(size=crop.size, train=True, mean_enlarge=crop.train_mean_enlarge,
                    max_enlarge=crop.train_max_enlarge)  # fmt: skip
    dataset = ShardedInstances(config["instances"], config["images"], spec, seed=tcfg.seed)
    steps_per_epoch = max(1, len(dataset) // tcfg.batch_size)
    total = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps > 0:
        total = min(total, tcfg.max_steps)
    lr = tcfg.lr * (tcfg.batch_size if tcfg.scale_lr else 1)
    optimizer = torch.optim.AdamW(
        param_groups(model, lr, tcfg.encoder_lr_scale), lr=lr, weight_decay=tcfg.weight_decay
    )
    scheduler = warmup_cosine(optimizer, tcfg.warmup_steps, total)
    crf_fn = build_crf(lcfg.crf, n_iters=lcfg.crf_iters) if stage == "generator" else None
    caching = stage == "generator" and tcfg.cache_views > 0
    sharing = shares_frozen_prefix if caching else shares_frozen_encoder
    shared = stage == "generator" and extractor is not None and sharing(teacher, extractor)
    amp = tcfg.amp and device.type == "cuda"
    gen = torch.Generator().manual_seed(tcfg.seed * 1000)
    loader_workers = int(config.get("loader_workers", 1))
    cache = None
    if caching:
        cache = _encode_views(teacher, extractor, dataset, tcfg, rcfg, lcfg, device, shared, 0, 1)
    parts = StepParts(stage, model, model, teacher, extractor, optimizer, scheduler, rcfg, lcfg,
                      crf_fn, device, amp, gen, shared, tcfg.ema_momentum)  # fmt: skip

    step, epoch, history = 0, 0, []
    epochs = math.ceil(total / steps_per_epoch)
    progress = Progress(STAGE_TAGS[stage], total, interval_s=interval_s)
    t_prev = t_loop = time.perf_counter()
    stopped = False
    while step < total and not stopped:
        if cache is not None:
            loader = view_batches(cache, epoch, tcfg.cache_views, tcfg.batch_size,
                                  steps_per_epoch, 0, tcfg.seed)  # fmt: skip
        else:
            loader = _loader(dataset, tcfg, 0, 1, epoch, 0, loader_workers)
        for batch in loader:
            if step >= total or stopped:
                break
            t0 = time.perf_counter()
            logs = train_step(parts, batch, cached=cache is not None)
            t1 = time.perf_counter()
            step += 1
            n = next(iter(batch.values())).shape[0]
            logs.update(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0], step_s=t1 - t0,
                        samples_per_s=n / max(t1 - t_prev, 1e-9))  # fmt: skip
            history.append(logs)
            t_prev = t1
            line = progress.update(step, {"epoch": f"{epoch + 1}/{epochs}"}, {"loss": logs["loss"]})
            if line:
                emit(line)
            stopped = max_seconds is not None and t1 - t_loop > max_seconds and step < total
        epoch += 1
    emit(progress.summary({"loss": history[-1]["loss"] if history else float("nan")}))

    export = teacher if teacher is not None else model
    data = export_bytes(model, teacher, mcfg.generator, kwargs, step, True)
    uri = None
    if out is not None:
        uri = storage.join(out, MODEL_FILE)
        storage.publish_bytes(uri, data)
    return LocalResult(export.eval(), data, step, history, uri, stopped)


__all__ = ["LocalResult", "fit_local"]
