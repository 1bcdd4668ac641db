"""Ray Train worker of stage 2: ``train_loop_per_worker`` runs an mmengine ``Runner``.

Each worker selects its CUDA device (GPU), allow-lists the mmengine checkpoint types, copies
``s3://`` annotation files and the checkpoint to resume from to a local work dir, sets the
distributed settings of the config and trains with :class:`RayTrainReportHook` registered.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from mmengine.config import Config

from exits import storage
from exits.compat import lvis_numpy_compat
from exits.stage2.logs import forward_iteration_lines
from exits.stage2.report_hook import CKPT_META, LOCAL_WORK_PREFIX, RayTrainReportHook
from exits.stage2.safe_globals import register_mmengine_safe_globals

logger = logging.getLogger(__name__)


def checkpoint_file(ckpt_dir: str) -> str:
    """The mmengine ``.pth`` inside a Ray checkpoint directory."""
    meta_path = os.path.join(ckpt_dir, CKPT_META)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return os.path.join(ckpt_dir, json.load(f)["file"])
    (path,) = glob.glob(os.path.join(ckpt_dir, "*.pth"))
    return path


def localize_checkpoint(checkpoint: Any, dest_dir: str) -> str:
    """Copy the mmengine ``.pth`` of a Ray ``Checkpoint`` to ``dest_dir``; returns its path."""
    os.makedirs(dest_dir, exist_ok=True)
    with checkpoint.as_directory() as d:
        src = checkpoint_file(d)
        dst = os.path.join(dest_dir, os.path.basename(src))
        shutil.copy2(src, dst)
    return dst


def localize_inputs(cfg: Config, dest_dir: str) -> None:
    """Download ``s3://`` annotation files of the config to ``dest_dir`` (in place).

    Images are read by mmengine's file backends, which have no s3 support: ``images_root``
    must be a local or shared path on every worker.
    """
    targets = [cfg[k]["dataset"] for k in ("train_dataloader", "val_dataloader", "test_dataloader")]
    targets += [cfg[k] for k in ("val_evaluator", "test_evaluator") if isinstance(cfg.get(k), dict)]
    cache: dict[str, str] = {}
    for t in targets:
        uri = t.get("ann_file")
        if not (isinstance(uri, str) and storage.is_s3(uri)):
            continue
        if uri not in cache:
            local = os.path.join(dest_dir, f"{len(cache)}_{os.path.basename(uri)}")
            with open(local, "wb") as f:
                f.write(storage.read_bytes(uri))
            cache[uri] = local
        t["ann_file"] = cache[uri]


def prepare_worker_config(
    cfg: Config, work_dir: str, device_index: int | None, resume_from: str | None
) -> Config:
    """Distributed settings for one Ray worker: launcher, DDP wrapper, local work dir, resume.

    ``device_index``: this worker's CUDA device, None on CPU.
    """
    cfg.launcher = "pytorch"
    cfg.work_dir = work_dir
    cfg.model_wrapper_cfg = dict(
        type="MMDistributedDataParallel",
        broadcast_buffers=False,
        find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
        device_ids=None if device_index is None else [device_index],  # None for CPU modules
    )
    ev = cfg.val_evaluator
    if isinstance(ev, dict) and "outfile_prefix" not in ev:
        ev.outfile_prefix = os.path.join(work_dir, "predictions", "val")
    cfg.load_from = resume_from
    cfg.resume = resume_from is not None
    return cfg


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float] | None:
    """Ray Train entry point.

    Args:
        config: ``{"cfg": mmengine config dict, "resume": bool, "run_dir": str, "name": str,
            "use_gpu": bool}``.

    Returns:
        The last validation metrics (rank 0's become ``Result.return_value``).
    """
    import ray.train
    import ray.train.torch
    from mmengine.runner import Runner

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    use_gpu = torch.cuda.is_available() and config.get("use_gpu", False)
    device_index = None
    if use_gpu:  # mmengine moves the model to the *current* CUDA device
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        device_index = device.index
    register_mmengine_safe_globals()
    if config["cfg"].get("exits_stage2", {}).get("dataset") == "lvis":
        lvis_numpy_compat()  # mmdet's LVISMetric runs lvis 0.5.3's LVISEval
    work_dir = tempfile.mkdtemp(prefix=f"{LOCAL_WORK_PREFIX}{config['name']}-r{rank}-")
    try:
        cfg = Config(config["cfg"])
        localize_inputs(cfg, work_dir)
        checkpoint = ray.train.get_checkpoint() if config.get("resume", True) else None
        resume_from = (
            localize_checkpoint(checkpoint, os.path.join(work_dir, "resume"))
            if checkpoint
            else None
        )
        prepare_worker_config(cfg, work_dir, device_index, resume_from)
        if rank == 0:
            logger.info("stage 2 on %d workers, resume from %s", ctx.get_world_size(), resume_from)

        runner = Runner.from_cfg(cfg)
        if rank == 0:  # iteration/ETA lines to the driver's console (exits/stage2/logs.py)
            forward_iteration_lines(runner.logger)
        hook = RayTrainReportHook(run_dir=config.get("run_dir"))
        runner.register_hook(hook)
        runner.train()
        if hook.last_val_metrics is None:  # resumed a finished run: no iteration, no validation
            runner.val()
        return hook.last_val_metrics
    finally:  # local checkpoints are large; the run directory has the reported ones
        shutil.rmtree(work_dir, ignore_errors=True)
