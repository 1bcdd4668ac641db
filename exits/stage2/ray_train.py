"""Stage 2 under Ray Train: each worker runs an mmengine ``Runner`` on Ray's process group.

Layout of a run directory ``<storage_path>/<name>`` (local path or ``s3://…``)::

    checkpoint_<timestamp>/        Ray Train checkpoints (latest ``num_to_keep`` kept)
        iter_<n>.pth | epoch_<n>.pth   the mmengine checkpoint (model, optimizer, schedulers,
                                       message hub: everything ``Runner.resume`` needs)
        config.py                       the mmengine config that produced it
        meta.json                       {"iter", "epoch", "file"}
    predictions/val_iter_<n>.{segm,bbox}.json   COCO results of each validation (rank 0)
    stage2_metrics.json            final metrics of the last ``train_stage2`` call

How it fits together:

* Ray creates the process group (gloo on CPU, nccl on GPU); the config is given
  ``launcher='pytorch'`` so ``Runner.setup_env`` sees an initialised group and reuses it.
  On GPU the worker selects its CUDA device itself before the Runner is built.
* mmengine's ``work_dir`` is a fresh folder on each worker's local disk; only rank 0 writes
  checkpoints there (mmengine saves on the main process), and :class:`RayTrainReportHook`
  hands each new one to ``ray.train.report`` which copies it into the run directory.
  Every rank reports (with ``checkpoint=None`` off rank 0), as Ray Train requires.
* Resume: a second ``fit`` with the same ``storage_path`` + ``name`` (or a re-run after the
  driver was killed, or Ray's own restart after a worker failure) gets the latest checkpoint
  from ``ray.train.get_checkpoint()``; each worker copies it to local disk and the Runner
  resumes from it (``load_from`` + ``resume=True``) at the saved iteration.
* ``torch.load`` defaults to ``weights_only=True``: :func:`register_mmengine_safe_globals`
  allow-lists exactly the non-tensor types an mmengine checkpoint pickles.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from mmengine.config import Config
from mmengine.hooks import Hook

from exits import storage
from exits.compat import lvis_numpy_compat
from exits.stage2.logs import forward_iteration_lines

logger = logging.getLogger(__name__)

CKPT_META = "meta.json"
CKPT_CONFIG = "config.py"
PREDICTIONS_DIR = "predictions"
METRICS_FILE = "stage2_metrics.json"
LOCAL_WORK_PREFIX = "exits-stage2-"
DEFAULT_NUM_TO_KEEP = 2  # Ray checkpoints kept in the run directory
TRAIN_SCALARS = ("train/loss", "train/lr")  # message-hub scalars reported with checkpoints
# numpy dtypes whose arrays/scalars mmengine may pickle (message hub, runtime info)
NUMPY_DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_)


# --------------------------------------------------------------------------- torch.load
def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` while unpickling: HistoryBuffer's public methods only.

    ``HistoryBuffer.__getstate__`` pickles its statistics methods (``HistoryBuffer.min`` …),
    which protocol 2 writes as ``getattr(HistoryBuffer, "min")``. Allow-listing the real
    ``getattr`` would allow any attribute access on any allowed object; this allows exactly
    what mmengine writes.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    if (
        obj is HistoryBuffer
        and not name.startswith("_")
        and callable(getattr(HistoryBuffer, name, None))
    ):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed in a checkpoint")


def mmengine_safe_globals() -> list[Any]:
    """Non-tensor globals pickled in an mmengine checkpoint, for ``weights_only=True``.

    Found by listing the GLOBAL opcodes of Mask R-CNN / SOLOv2 / Mask2Former checkpoints
    (mmengine 0.10.7, numpy 2.x): the message hub keeps ``HistoryBuffer`` objects (float64
    arrays + their statistics methods via ``getattr``), runtime info holds numpy scalars.
    numpy 1.x wrote ``numpy.core.multiarray``; both spellings are registered.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    dtype_classes = [type(np.dtype(t)) for t in NUMPY_DTYPES]  # e.g. numpy.dtypes.Float64DType
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        *dtype_classes,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (_history_buffer_getattr, "__builtin__.getattr"),  # protocol-2 name of builtins.getattr
        (_history_buffer_getattr, "builtins.getattr"),
    ]


def register_mmengine_safe_globals() -> None:
    """Allow-list :func:`mmengine_safe_globals` for ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals(mmengine_safe_globals())


# --------------------------------------------------------------------------- hook
def _report(metrics: Mapping[str, Any], checkpoint: Any = None) -> None:
    import ray.train

    ray.train.report(dict(metrics), checkpoint=checkpoint)


class RayTrainReportHook(Hook):
    """Report metrics and new mmengine checkpoints to Ray Train.

    Runs after mmengine's ``CheckpointHook`` (priority LOWEST vs VERY_LOW). When that hook
    wrote a checkpoint (``message_hub`` info ``last_ckpt`` changed) the checkpoint is held
    until the next event, so that it is reported *with* the validation metrics when a
    validation follows it (Ray Train's ``Result.metrics`` are those of the latest
    checkpoint): at ``after_val_epoch`` (val metrics), else at the next ``before_train_iter``
    or ``after_train`` (train metrics). Every rank calls ``ray.train.report`` the same number
    of times; rank 0 attaches a directory with the ``.pth``, ``config.py`` and ``meta.json``.
    After a validation, rank 0 also uploads the evaluator's COCO results json to the run dir.

    Reported keys: ``iter`` (completed iterations), ``epoch``, ``start_iter`` (where this
    session started or resumed), ``train/loss``, ``train/lr``, and after a validation the
    evaluator's metrics (e.g. ``coco/segm_mAP``). ``last_val_metrics`` keeps the latest.
    """

    priority = "LOWEST"

    def __init__(
        self,
        run_dir: str | None = None,
        report_fn: Callable[[Mapping[str, Any], Any], None] = _report,
    ) -> None:
        self.run_dir = run_dir
        self.report_fn = report_fn
        self.start_iter = 0
        self.last_val_metrics: dict[str, float] | None = None
        self._seen_ckpt: str | None = None
        self._pending: tuple[str, int] | None = None  # (checkpoint path, completed iters)

    def before_train(self, runner) -> None:
        self.start_iter = runner.iter
        self._seen_ckpt = runner.message_hub.get_info("last_ckpt")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._hold_new_checkpoint(runner, completed_iters=runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        self._hold_new_checkpoint(runner, completed_iters=runner.iter)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._flush(runner, {})

    def after_train(self, runner) -> None:
        self._flush(runner, {})

    def after_val_epoch(self, runner, metrics: Mapping[str, float] | None = None) -> None:
        self.last_val_metrics = {
            **self._base_metrics(runner, runner.iter),
            **_floats(metrics or {}),
        }
        if runner.rank == 0:
            self._upload_predictions(runner)
        if self._pending is None:
            self.report_fn(self.last_val_metrics, None)
        else:
            self._flush(runner, self.last_val_metrics)

    # ----------------------------------------------------------------- internals
    def _base_metrics(self, runner, completed_iters: int) -> dict[str, float]:
        out: dict[str, float] = {
            "iter": completed_iters,
            "epoch": runner.epoch,
            "start_iter": self.start_iter,
        }
        for key in TRAIN_SCALARS:
            if key in runner.message_hub.log_scalars:
                out[key] = float(runner.message_hub.get_scalar(key).current())
        return out

    def _hold_new_checkpoint(self, runner, completed_iters: int) -> None:
        last = runner.message_hub.get_info("last_ckpt")
        if last is not None and last != self._seen_ckpt:
            self._seen_ckpt = last
            self._pending = (last, completed_iters)

    def _flush(self, runner, extra: Mapping[str, float]) -> None:
        """Report the held checkpoint (if any) with the train metrics plus ``extra``."""
        if self._pending is None:
            return
        path, completed_iters = self._pending
        self._pending = None
        metrics = {**self._base_metrics(runner, completed_iters), **extra}
        if runner.rank != 0:
            self.report_fn(metrics, None)
            return
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix=LOCAL_WORK_PREFIX + "ckpt-") as tmp:
            _link_or_copy(path, os.path.join(tmp, os.path.basename(path)))
            runner.cfg.dump(os.path.join(tmp, CKPT_CONFIG))
            meta = {"iter": completed_iters, "epoch": runner.epoch, "file": os.path.basename(path)}
            with open(os.path.join(tmp, CKPT_META), "w") as f:
                json.dump(meta, f)
            self.report_fn(metrics, Checkpoint.from_directory(tmp))

    def _upload_predictions(self, runner) -> None:
        prefix = _outfile_prefix(runner.cfg)
        if not (self.run_dir and prefix):
            return
        for path in glob.glob(prefix + ".*.json"):
            name = f"val_iter_{runner.iter}{path[len(prefix) :]}"
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(self.run_dir, PREDICTIONS_DIR, name), f.read())


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float | np.number)}


def _outfile_prefix(cfg: Config) -> str | None:
    ev = cfg.get("val_evaluator")
    ev = ev[-1] if isinstance(ev, list | tuple) else ev
    return ev.get("outfile_prefix") if ev else None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- worker
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


# --------------------------------------------------------------------------- driver
def train_stage2(
    cfg_dict: Config | Mapping[str, Any],
    num_workers: int,
    use_gpu: bool,
    storage_path: str,
    name: str,
    resume: bool = True,
    *,
    cpus_per_worker: float = 1,
    max_failures: int = 0,
    num_to_keep: int = DEFAULT_NUM_TO_KEEP,
    storage_filesystem: Any = None,
):
    """Train a stage-2 mmdet model with Ray Train; returns the ``ray.train.Result``.

    Args:
        cfg_dict: config from :func:`exits.stage2.configs.build_stage2_config` (or its dict).
            Annotation files may be ``s3://`` URIs; images must be reachable on every worker.
        num_workers: Ray Train workers (one per GPU on clusters).
        use_gpu: nccl + one GPU per worker; else gloo on CPU.
        storage_path: parent of the run directory (local path or ``s3://bucket/prefix``).
        name: run name; re-using ``storage_path`` + ``name`` resumes from the latest checkpoint.
        resume: False trains from scratch even if the run directory has checkpoints.
        cpus_per_worker: CPUs reserved per worker.
        max_failures: Ray restarts after a worker failure (each restart resumes).
        num_to_keep: Ray checkpoints kept in the run directory.
        storage_filesystem: pyarrow filesystem for ``storage_path`` (default: resolved by
            :mod:`exits.storage`, which honours ``EXITS_S3_ENDPOINT``).

    Returns:
        ``Result`` with ``checkpoint`` (latest), ``metrics`` (those reported with it: the
        final validation, e.g. ``coco/segm_mAP``, plus ``iter``/``start_iter``),
        ``return_value`` (rank 0's last validation metrics) and ``path``.
        :func:`final_metrics` of it is also written to ``<run dir>/stage2_metrics.json``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = cfg_dict.to_dict() if isinstance(cfg_dict, Config) else dict(cfg_dict)
    if storage.is_s3(storage_path) or storage_filesystem is not None:
        fs, fs_path = storage.get_filesystem(storage_path, storage_filesystem)
    else:  # local: Ray resolves it itself
        fs, fs_path = None, os.path.abspath(storage_path)
    run_dir = storage.join(storage_path, name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "resume": resume,
            "run_dir": run_dir,
            "name": name,
            "use_gpu": use_gpu,
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=fs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
    )
    result = trainer.fit()
    storage.write_json(storage.join(run_dir, METRICS_FILE), final_metrics(result))
    return result


def final_metrics(result: Any) -> dict[str, float]:
    """Last validation metrics of a ``train_stage2`` result (else the latest checkpoint's)."""
    return dict(result.return_value or result.metrics or {})
