"""Drive a stage-1 training run with Ray Train's ``TorchTrainer`` and publish its artifacts.

Artifacts under ``<run>/<stage>/``: ``model.pt`` (self-describing, see checkpoints.py),
``metrics.csv`` (per-step losses, retrieved FG/BG counts, lr, samples/s, from rank 0),
``loss.png``; Ray Train's own checkpoints live in ``<run>/<stage>/ray/train``, which is also
what a re-submitted run resumes from.
"""

from __future__ import annotations

import csv
import io
import os

import torch

from exits import storage
from exits.config import TrainConfig
from exits.data.visualize import loss_curve_png
from exits.train.loops import MODEL_FILE, STATE_FILE, train_loop_per_worker


def ray_storage(uri: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for ``RunConfig`` (pyarrow ignores AWS_ENDPOINT_URL)."""
    if storage.is_s3(uri):
        return uri[len("s3://") :], storage.s3_filesystem()
    return os.path.abspath(uri), None


NODE_RESOURCE_SHARE = 0.001  # of a node-type resource (e.g. train_node: 1) per worker


def worker_resources(use_gpu: bool, node_resource: str = "") -> dict[str, float] | None:
    """``resources_per_worker`` of a stage-1 worker: None (Ray's default: {"GPU": 1} with GPUs,
    else {"CPU": 1}) unless ``node_resource`` pins the workers to a node type."""
    if not node_resource:
        return None
    return {**({} if use_gpu else {"CPU": 1.0}), node_resource: NODE_RESOURCE_SHARE}


def fit(loop_config: dict, tcfg: TrainConfig, storage_uri: str, name: str = "train"):
    """Run (or resume) ``train_loop_per_worker`` on ``tcfg.num_workers`` Ray Train workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path, fs = ray_storage(storage_uri)
    cuda = tcfg.use_gpu and not tcfg.logical_gpus  # logical GPUs: requested, torch on CPU
    run_config = RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=tcfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker=worker_resources(tcfg.use_gpu, tcfg.node_resource),
        ),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo", timeout_s=600),
        run_config=run_config,
    )
    return trainer.fit()


def history_from_result(result) -> list[dict]:
    """Rank-0 metric history stored in the final checkpoint."""
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    return list(state["history"])


def publish_artifacts(result, stage_uri: str) -> dict:
    """Copy model.pt out of the final checkpoint, write metrics.csv and loss.png."""
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, MODEL_FILE), "rb") as f:
            storage.publish_bytes(storage.join(stage_uri, MODEL_FILE), f.read())
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    history = list(state["history"])
    write_metrics(history, stage_uri)
    return {
        "steps": int(state["step"]),
        "history": history,
        "resumed_from": list(state.get("resumed_from", [])),
    }


def write_metrics(history: list[dict], stage_uri: str) -> None:
    if not history:
        return
    keys = sorted({k for h in history for k in h})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    storage.publish_bytes(storage.join(stage_uri, "metrics.csv"), buf.getvalue().encode())
    storage.publish_bytes(storage.join(stage_uri, "loss.png"), loss_curve_png(history))
