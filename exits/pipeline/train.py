"""Stage adapters ``warmup`` (1a) and ``generator`` (1b): Ray Train fit, artifacts, metrics."""

from __future__ import annotations

import time
from dataclasses import asdict

from exits import manifest, storage
from exits.config import PipelineConfig
from exits.method.similarity import EXTRACTOR_SOURCES
from exits.pipeline.common import data_paths, stage_uri


def _train_stage(cfg: PipelineConfig, run: str, fp: str, stage: str) -> dict:
    from exits.train.loops import loop_config
    from exits.train.run import fit, publish_artifacts

    started = time.time()
    paths = data_paths(run)
    tcfg = cfg.warmup if stage == "warmup" else cfg.generator
    extractor = None
    if (
        stage == "generator"
        and cfg.retrieval.similarity in EXTRACTOR_SOURCES
        and cfg.loss.objective == "exits"
    ):
        extractor = stage_uri(run, "warmup", "model.pt")
    loop = loop_config(
        stage, stage_uri(run, "prepare", "instances.parquet"), paths["images"], cfg.crop, cfg.model,
        cfg.retrieval, cfg.loss, tcfg, extractor_checkpoint=extractor, marker_dir=stage_uri(run, stage),
    )  # fmt: skip
    if stage == "generator":  # refuse a token cache over generator.cache_max_gb before Ray Train
        from exits.train.feature_cache import check_run_token_cache

        check_run_token_cache(loop["instances"], cfg.model, cfg.crop.size, tcfg,
                              cfg.loss.objective == "exits")  # fmt: skip
    result = fit(loop, tcfg, stage_uri(run, stage, "ray"), name="train")
    if result.error is not None:
        raise RuntimeError(f"stage {stage} failed: {result.error}")
    art = publish_artifacts(result, stage_uri(run, stage))
    metrics = _stage_metrics(cfg, run, stage, paths, extractor)
    last = art["history"][-1] if art["history"] else {}
    return manifest.write_manifest(
        run, stage, fp, started,
        checkpoint=stage_uri(run, stage, "model.pt"), steps=art["steps"], final_loss=last.get("loss"),
        resumed_from_steps=art["resumed_from"],
        samples_per_s=_median([h.get("samples_per_s", 0.0) for h in art["history"]]),
        metrics=metrics, config={"train": asdict(tcfg), "loss": asdict(cfg.loss), "retrieval": asdict(cfg.retrieval)},
    )  # fmt: skip


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return float(xs[len(xs) // 2]) if xs else 0.0


def _stage_metrics(
    cfg: PipelineConfig, run: str, stage: str, paths: dict, extractor: str | None
) -> dict:
    """1a: retrieval quality of the configured similarity source; 1b: held-out pseudo-label mIoU."""
    import torch

    from exits.checkpoints import load_model
    from exits.data.coco import read_table
    from exits.evaluate.diagnostics import retrieval_stats
    from exits.evaluate.quality import evaluate_generator
    from exits.train.data import CropDataset, CropSpec

    val_uri = stage_uri(run, "prepare", "val_instances.parquet")
    if not storage.exists(val_uri):
        return {}
    table = read_table(val_uri)
    if table.num_rows == 0 or table["gt_segmentation"].null_count == table.num_rows:
        return {}
    model, _ = load_model(stage_uri(run, stage, "model.pt"))
    if stage == "warmup":
        spec = CropSpec(
            size=cfg.crop.size, train=False, inference_enlarge=cfg.crop.inference_enlarge
        )
        loader = torch.utils.data.DataLoader(
            CropDataset(table, paths["val_images"], spec, max_image_bytes=cfg.data.max_image_bytes),
            batch_size=32,
        )
        out = {}
        for source in ("attention", cfg.retrieval.similarity):
            rc = cfg.retrieval.__class__(**{**asdict(cfg.retrieval), "similarity": source})
            out[f"retrieval_{source}"] = retrieval_stats(loader, model.grid, rc, extractor=model)
        return out
    return {"pseudo_label": evaluate_generator(model, table, paths["val_images"], cfg.crop.size,
                                               cfg.crop.inference_enlarge, cfg.label.threshold)}  # fmt: skip


def run_warmup(cfg: PipelineConfig, run: str, fp: str) -> dict:
    return _train_stage(cfg, run, fp, "warmup")


def run_generator(cfg: PipelineConfig, run: str, fp: str) -> dict:
    return _train_stage(cfg, run, fp, "generator")
