"""Stage 2 under Ray Train, the driver: each worker runs an mmengine ``Runner`` on Ray's group.

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

Modules: :mod:`~exits.stage2.driver` (``train_stage2``, this), :mod:`~exits.stage2.worker`
(``train_loop_per_worker``), :mod:`~exits.stage2.report_hook` (``RayTrainReportHook``),
:mod:`~exits.stage2.safe_globals` (the ``weights_only`` allow-list).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mmengine.config import Config

from exits import storage
from exits.stage2.worker import train_loop_per_worker

METRICS_FILE = "stage2_metrics.json"
DEFAULT_NUM_TO_KEEP = 2  # Ray checkpoints kept in the run directory


def train_stage2(
    cfg_dict: Config | Mapping[str, Any],
    num_workers: int,
    use_gpu: bool,
    storage_path: str,
    name: str,
    resume: bool = True,
    *,
    cpus_per_worker: float = 1,
    node_resource: str = "",
    logical_gpus: bool = False,
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
        node_resource: custom resource each worker asks 0.001 of (pins it to a node type).
        logical_gpus: with ``use_gpu``: request one GPU per worker from Ray (scheduling,
            autoscaling) but train on CPU with gloo (clusters whose GPUs are logical only,
            e.g. the fake multi-node test cluster), as stage 1's ``TrainConfig.logical_gpus``.
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
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg_dict.to_dict() if isinstance(cfg_dict, Config) else dict(cfg_dict)
    if storage.is_s3(storage_path) or storage_filesystem is not None:
        fs, fs_path = storage.get_filesystem(storage_path, storage_filesystem)
    else:  # local: Ray resolves it itself
        fs, fs_path = None, os.path.abspath(storage_path)
    run_dir = storage.join(storage_path, name)
    cuda = use_gpu and not logical_gpus  # logical GPUs: requested, torch on CPU
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "resume": resume,
            "run_dir": run_dir,
            "name": name,
            "use_gpu": cuda,
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": cpus_per_worker,
                **({node_resource: 0.001} if node_resource else {}),
            },
        ),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
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
