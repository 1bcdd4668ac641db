"""exits.config: overrides are type-checked, defaults are defined once."""

from __future__ import annotations

import pytest

from exits.config import LabelConfig, LossConfig, PipelineConfig, load_config


@pytest.mark.parametrize(
    "override", ["loss.lambda_mil=abc", "warmup.epochs=1.5", "label.use_gpu=1", "device=3"]
)
def test_override_of_the_wrong_type_fails_fast(override):
    with pytest.raises(TypeError, match=override.split("=")[0]):
        load_config("demo", [override])


def test_override_values_that_fit():
    cfg = load_config("demo", ["generator.lr=5e-4", "generator.epochs=2", "loss.lambda_mil=2",
                               "model.attention_block=null", "retrieval.tau_fg=0.002"])  # fmt: skip
    assert cfg.generator.lr == 5e-4 and isinstance(cfg.generator.lr, float)  # YAML 1.1: a str
    assert cfg.generator.epochs == 2 and cfg.loss.lambda_mil == 2
    assert cfg.model.attention_block is None and cfg.retrieval.tau_fg == 0.002


def test_no_config_file_gives_the_dataclass_defaults_and_the_cuda_switch():
    assert load_config(None) == PipelineConfig()
    cfg = load_config(None, ["device=cuda"])
    assert cfg.label.use_gpu and cfg.label.gpus_per_actor == 1.0 and cfg.generator.use_gpu


def test_defaults_defined_once():
    from exits.data import crops
    from exits.method import crf, losses, retrieval, similarity
    from exits.model import generator

    assert losses.LAMBDA_MIL == LossConfig.lambda_mil == 4.0  # MAL's value, as every profile
    assert crf.N_ITERS == LossConfig.crf_iters
    assert retrieval.PAPER_HOPS == 3 and retrieval.SINKHORN_ITERS == 50
    assert similarity.THETA_POS == 1.5 and similarity.TOKEN_TEMPERATURE == 0.05
    assert crops.INFERENCE_ENLARGE == 1.3 and crops.TRAIN_MAX_ENLARGE == 1.6
    assert generator.EMA_MOMENTUM == 0.996
    assert LabelConfig().shard_images == 64


def test_token_cache_needs_a_frozen_encoder_part():
    assert load_config("coco_mini", ["generator.cache_views=2"]).generator.cache_views == 2
    two = load_config("coco_mini", ["generator.cache_views=2", "model.trainable_blocks=2"])
    assert two.model.trainable_blocks == 2  # the last 2 blocks train on the cached prefix
    with pytest.raises(ValueError, match="generator.cache_views = 2 needs a frozen encoder part"):
        load_config("coco_mini", ["generator.cache_views=2", "model.trainable_blocks=-1"])
    with pytest.raises(ValueError, match="generator.cache_views = -1 is outside"):
        load_config("coco_mini", ["generator.cache_views=-1"])
