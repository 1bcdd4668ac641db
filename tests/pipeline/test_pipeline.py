"""Pipeline orchestration: manifests, skipping finished stages, re-running what a change affects."""

from __future__ import annotations

import time

import pytest

from exits import manifest, pipeline
from exits.config import load_config


@pytest.fixture
def fake_stages(monkeypatch):
    calls: list[str] = []

    def make(stage):
        def run(cfg, run_dir, fp):
            calls.append(stage)
            return manifest.write_manifest(run_dir, stage, fp, time.time(), counts={"n": 1})

        return run

    monkeypatch.setattr(pipeline.runner, "STAGE_FUNCS", {s: make(s) for s in manifest.STAGES})
    return calls


def test_skip_and_rerun_downstream(tmp_path, fake_stages):
    cfg = load_config("demo")
    out = str(tmp_path / "run")
    pipeline.run_pipeline(cfg, out)
    assert fake_stages == list(manifest.STAGES)
    fake_stages.clear()
    pipeline.run_pipeline(cfg, out)
    assert fake_stages == []  # everything done
    cfg.generator.epochs += 1  # a 1b change redoes 1b and everything after it, not prepare/1a
    pipeline.run_pipeline(cfg, out)
    assert fake_stages == ["generator", "label", "stage2", "eval"]
    fake_stages.clear()
    pipeline.run_pipeline(cfg, out, stages=["warmup"], force=True)
    assert fake_stages == ["warmup"]
    fake_stages.clear()
    pipeline.run_pipeline(cfg, out, from_stage="stage2", force=True)
    assert fake_stages == ["stage2", "eval"]


def test_half_written_stage_is_redone(tmp_path, fake_stages):
    cfg = load_config("demo")
    out = str(tmp_path / "run")
    pipeline.run_pipeline(cfg, out, stages=["prepare"])
    # a crashed stage leaves artifacts but no manifest: it must run again
    (tmp_path / "run" / "warmup").mkdir()
    (tmp_path / "run" / "warmup" / "partial.bin").write_bytes(b"x")
    fake_stages.clear()
    pipeline.run_pipeline(cfg, out, stages=["prepare", "warmup"])
    assert fake_stages == ["warmup"]


def test_unknown_stage_and_config_key_fail_fast(tmp_path):
    with pytest.raises(ValueError, match="unknown stages"):
        pipeline.run_pipeline(load_config("demo"), str(tmp_path), stages=["nope"])
    with pytest.raises(KeyError, match="unknown config key"):
        load_config("demo", ["generator.epochz=3"])
    with pytest.raises(FileNotFoundError, match="known"):
        load_config("no-such-dataset")


def test_overrides_and_gpu_switch():
    cfg = load_config("coco", ["generator.epochs=2", "retrieval.tau_fg=0.002"])
    assert cfg.generator.epochs == 2 and cfg.retrieval.tau_fg == 0.002
    assert cfg.warmup.use_gpu and cfg.label.gpus_per_actor == 1
    assert cfg.retrieval.similarity == "attention" and cfg.loss.balanced_bce == 0  # paper profile
    assert (
        load_config("lvis").data.name == "lvis"
        and load_config("lvis").stage2.model == "mask_rcnn_r50"
    )


def test_relative_data_paths_resolved_against_the_start_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("coco_mini", ["data.val_images=s3://bucket/val"])
    assert cfg.data.annotations == str(
        tmp_path.parent / "shared" / "data" / "coco_train128" / "instances_train2017.json"
    )
    assert cfg.data.val_images == "s3://bucket/val"  # URIs untouched
    assert cfg.data.holdout_images == 32 and cfg.model.generator == "vit_small_dinov2"


def test_cpu_actor_pool_leaves_a_cpu_for_decoding(monkeypatch):
    import ray

    from exits.config import LabelConfig
    from exits.pipeline.label import _fit_actor_pool

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert _fit_actor_pool(LabelConfig(num_actors=4)).num_actors == 1  # 2 CPUs: 1 actor + decode
    assert _fit_actor_pool(LabelConfig(num_actors=1)).num_actors == 1
    gpu = LabelConfig(num_actors=4, use_gpu=True, gpus_per_actor=1.0)
    assert _fit_actor_pool(gpu) is gpu  # GPU actors are left alone
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    assert _fit_actor_pool(LabelConfig(num_actors=2)).num_actors == 2  # nothing fits: unchanged
