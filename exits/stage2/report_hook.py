"""mmengine hook that hands metrics and new checkpoints to ``ray.train.report``.

Layout of a Ray checkpoint directory it reports (see :mod:`exits.stage2.driver` for the run
directory)::

    iter_<n>.pth | epoch_<n>.pth   the mmengine checkpoint
    config.py                       the mmengine config that produced it
    meta.json                       {"iter", "epoch", "file"}
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from mmengine.config import Config
from mmengine.hooks import Hook

from exits import storage

CKPT_META = "meta.json"
CKPT_CONFIG = "config.py"
PREDICTIONS_DIR = "predictions"
LOCAL_WORK_PREFIX = "exits-stage2-"
TRAIN_SCALARS = ("train/loss", "train/lr")  # message-hub scalars reported with checkpoints


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
