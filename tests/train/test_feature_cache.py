"""Frozen-encoder token cache (exits/train/feature_cache.py): the cached step computes the same
objective as the uncached one; batches are deterministic and resumable."""

from __future__ import annotations

import pytest
import torch

from exits.config import LossConfig, RetrievalConfig
from exits.data.prepare import load_instances
from exits.method.crf import build_crf
from exits.model.generator import (
    build_generator,
    build_similarity_extractor,
    make_teacher,
    shares_frozen_encoder,
    shares_frozen_prefix,
)
from exits.train import feature_cache as fc
from exits.train import steps
from exits.train.data import CropDataset, CropSpec

S, B = 96, 6


@pytest.fixture(scope="module")
def dataset(demo_dataset):
    table, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    return CropDataset(table, demo_dataset["images"], CropSpec(size=S, train=True), seed=3)


def _models(shared: bool, trainable_blocks: int = 0, attention_block: int = 1):
    torch.manual_seed(0)
    student = build_generator("vit_tiny_demo", img_size=S, trainable_blocks=trainable_blocks)
    teacher = make_teacher(student)
    for p in _trainable(teacher):  # a teacher that differs from the student where it trains
        p.data.add_(0.01 * torch.randn_like(p))
    extractor = build_similarity_extractor(
        "vit_tiny_demo", img_size=S, attention_block=attention_block, trainable_blocks=0
    )
    if shared:
        extractor.load_state_dict(student.state_dict())
        if trainable_blocks:  # stage 1a trained the extractor's last blocks too
            for p in extractor.encoder.vit.blocks[-trainable_blocks:].parameters():
                p.data.add_(0.01 * torch.randn_like(p))
    assert shares_frozen_encoder(teacher, extractor) == (shared and trainable_blocks == 0)
    first = extractor.encoder.depth - trainable_blocks
    assert shares_frozen_prefix(teacher, extractor) == (
        shared and (trainable_blocks == 0 or attention_block >= first)
    )
    return student, teacher, extractor


def _trainable(model):
    """Parameters the student trains (the teacher has requires_grad off everywhere)."""
    depth, k = model.encoder.depth, model.encoder.trainable_blocks
    blocks = [] if k == 0 else [*model.encoder.vit.blocks[depth - k :], model.encoder.vit.norm]
    return [p for m in (*blocks, model.decoder) for p in m.parameters()]


@pytest.mark.parametrize("trainable_blocks", [0, 1])
def test_forward_on_frozen_state_equals_forward_on_images(dataset, trainable_blocks):
    student, _, _ = _models(True, trainable_blocks)
    x = torch.randn(2, 3, S, S)
    state = student.encoder.frozen_state(x)
    assert state.shape == (2, (S // 8) ** 2 + (trainable_blocks > 0), 96)  # + the cls token
    assert torch.equal(student(x), student(state=state))
    with pytest.raises(ValueError, match="exactly one"):
        student(x, state=state)
    everything = build_generator("vit_tiny_demo", img_size=S)  # trainable_blocks -1: no prefix
    with pytest.raises(ValueError, match="no frozen prefix"):
        everything.encoder.frozen_state(x)


@pytest.mark.parametrize(
    "objective,similarity,shared,trainable_blocks,attention_block",
    [("exits", "attention", True, 0, 1), ("exits", "attention", False, 0, 1),
     ("exits", "bilateral", False, 0, 1), ("box_only", "attention", True, 0, 1),
     ("exits", "attention", True, 1, 1), ("exits", "attention", True, 1, 3),
     ("exits", "tokens", True, 2, 2), ("exits", "bilateral", False, 2, 1)],
)  # fmt: skip
def test_cached_step_equals_uncached_step(
    dataset, monkeypatch, objective, similarity, shared, trainable_blocks, attention_block
):
    """Same crops (view 0 = the dataset's epoch 0), no photometric augmentation, no dropout:
    the loss and the retrieval counts of the cached step equal the uncached step's (the state
    is cached in fp16: losses to 1e-3), and so do the gradients of everything that trains
    (the decoder and the last ``trainable_blocks`` blocks + final norm)."""
    monkeypatch.setattr(steps, "student_augment", lambda images, generator=None: images)
    rcfg = RetrievalConfig(similarity=similarity, threshold_rule="relative", dropout=0.0)
    lcfg = LossConfig(objective=objective, lambda_mil=1.0, balanced_bce=1.0)
    crf = build_crf("torch", n_iters=lcfg.crf_iters)
    student, teacher, extractor = _models(shared, trainable_blocks, attention_block)
    ext = extractor if similarity in ("attention", "tokens") else None
    shared = ext is not None and shares_frozen_encoder(teacher, ext)
    prefix_shared = ext is not None and shares_frozen_prefix(teacher, ext)
    dataset.set_epoch(0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(B)])
    loss_u, logs_u = steps.generator_loss(
        student, teacher, ext, batch, rcfg, lcfg, crf, None, shared
    )
    loss_u.backward()
    trained = _trainable(student)
    assert trained and all(p.requires_grad and p.grad is not None for p in trained)
    assert {id(p) for p in student.parameters() if p.requires_grad} == {id(p) for p in trained}
    grads_u = [p.grad.clone() for p in trained]
    student.zero_grad()

    cache = fc.encode_views(teacher, ext, dataset, list(range(B)), 1, rcfg, lcfg, 4,
                         torch.device("cpu"), shared=prefix_shared)  # fmt: skip
    prefix = 1 if trainable_blocks else 0  # the state entering a block keeps the cls token
    assert cache["state"].shape == (B, (S // 8) ** 2 + prefix, 96)
    assert cache["state"].dtype == torch.float16
    assert ("labels" in cache) == (objective == "exits")
    loss_c, logs_c = fc.cached_generator_loss(
        student, teacher, cache, rcfg, lcfg, crf, torch.device("cpu")
    )
    loss_c.backward()
    assert float(loss_c.detach()) == pytest.approx(float(loss_u.detach()), abs=1e-3)
    for key in ("retrieved_fg", "retrieved_bg", "no_retrieval_frac"):
        assert logs_c.get(key) == logs_u.get(key)
    for gu, p in zip(grads_u, trained, strict=True):
        assert torch.allclose(p.grad, gu, atol=2e-3, rtol=2e-2)


def test_views_are_the_datasets_epochs(dataset):
    """View v holds the crops the uncached loop draws at epoch v (random enlargement, flip)."""
    rcfg, lcfg = RetrievalConfig(similarity="bilateral"), LossConfig(objective="box_only")
    student, teacher, _ = _models(False)
    cache = fc.encode_views(teacher, None, dataset, [0, 1], 2, rcfg, lcfg, 8, torch.device("cpu"))
    for v in range(2):
        dataset.set_epoch(v)
        x = torch.stack([dataset[i]["image"] for i in (0, 1)]).float() / 255
        with torch.no_grad():
            tokens = teacher.encoder(steps.normalize(x))
        assert torch.allclose(cache["state"][2 * v : 2 * v + 2].float(), tokens, atol=1e-2)
    assert not torch.equal(cache["state"][0], cache["state"][2])  # the views differ


def test_view_batches_order_view_and_resume():
    n, views, bs, steps_ = 10, 3, 3, 3
    cache = {"row": torch.arange(views * n)}
    full = [b["row"] for b in fc.view_batches(cache, 4, views, bs, steps_, 0, seed=7)]
    assert len(full) == steps_ and all(len(r) == bs for r in full)
    rows = torch.cat(full)
    assert ((rows >= n) & (rows < 2 * n)).all()  # epoch 4 → view 1
    assert len(set(rows.tolist())) == steps_ * bs  # no row twice in an epoch
    again = [b["row"] for b in fc.view_batches(cache, 4, views, bs, steps_, 1, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(again, full[1:], strict=True))  # resume
    other = torch.cat([b["row"] for b in fc.view_batches(cache, 7, views, bs, steps_, 0, seed=7)])
    assert not torch.equal(other, rows)  # epoch 7 is view 1 too, in another order


def test_shards_partition_the_dataset():
    parts = [fc.shard_indices(11, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert parts[0] == [0, 3, 6, 9] and parts[2] == [2, 5, 8]


# ------------------------------------------------------------------ the cache's bound
def test_crop_cache_bytes_hand_numbers():
    """ViT-S/14 at 224² (N = 16, D = 384, h = 56): state 2·256·384 = 196,608 (the 197 KB),
    image 3·56² = 9,408, box 4·56² = 12,544, labels + keep 2·256 = 512."""
    assert fc.crop_cache_bytes(16, 384, 0, 56, points=True) == 219_072
    assert fc.crop_cache_bytes(16, 384, 0, 56, points=False) == 218_560
    assert fc.crop_cache_bytes(16, 384, 1, 56, points=True) == 219_072 + 768  # k > 0: + cls
    with torch.device("meta"):  # shapes only, no weights
        m = build_generator("vit_small_dinov2", img_size=224, trainable_blocks=0, pretrained=False)
    assert fc.model_crop_cache_bytes(m, points=True) == 219_072


@pytest.mark.parametrize("objective", ["exits", "box_only"])
def test_crop_cache_bytes_equal_what_encode_views_holds(dataset, objective):
    rcfg, lcfg = RetrievalConfig(similarity="bilateral"), LossConfig(objective=objective)
    _, teacher, _ = _models(False)
    cache = fc.encode_views(
        teacher, None, dataset, [0, 1, 2], 2, rcfg, lcfg, 8, torch.device("cpu")
    )
    held = sum(t.nbytes for t in cache.values())
    # demo: N = 12, D = 96, h = 24: 27,648 + 1,728 + 2,304 (+ 288 with points)
    per = fc.model_crop_cache_bytes(teacher, points=objective == "exits")
    assert per == 27_648 + 1_728 + 2_304 + (288 if objective == "exits" else 0)
    assert held == 2 * 3 * per


def test_cache_limit_explicit_and_from_node_memory():
    assert fc.cache_limit(4.0, 64 * 10**9, 4) == (4 * 10**9, "generator.cache_max_gb = 4")
    limit, source = fc.cache_limit(0.0, 64 * 10**9, 4)
    assert limit == 8 * 10**9  # half of 64 GB over 4 workers
    assert "64.0 GB node memory / 4 worker(s)" in source


def test_an_oversized_cache_is_refused_with_its_size():
    # 4 views x 10,000 crops x 219,072 bytes = 8,762,880,000 bytes > 4e9
    with pytest.raises(ValueError) as e:
        fc.check_token_cache(4, 10_000, 219_072, 4 * 10**9, "generator.cache_max_gb = 4")
    msg = str(e.value)
    assert "4 views x 10,000 crops per worker x 219,072 bytes per crop = 8.76 GB" in msg
    assert "over the limit of 4 GB (generator.cache_max_gb = 4)" in msg
    assert fc.check_token_cache(4, 4_000, 219_072, 4 * 10**9, "") == 3_505_152_000  # fits


def test_driver_refuses_before_ray_train(tmp_path, demo_dataset):
    """The pipeline's check: rows from the Parquet footers, shapes from a meta-device model."""
    from exits.config import ModelConfig, TrainConfig
    from exits.data.coco import write_table

    table, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    uri = str(tmp_path / "instances.parquet")
    write_table(table, uri)
    crops = -(-table.num_rows // 3)  # rank 0's share over 3 workers
    need = 2 * crops * (27_648 + 1_728 + 2_304 + 288)
    mcfg = ModelConfig(generator="vit_tiny_demo", trainable_blocks=0)
    fits = TrainConfig(cache_views=2, num_workers=3, cache_max_gb=need / 1e9)
    fc.check_run_token_cache(uri, mcfg, S, fits, points=True)  # exactly at the limit: fits
    over = TrainConfig(cache_views=2, num_workers=3, cache_max_gb=(need - 1) / 1e9)
    with pytest.raises(ValueError, match=f"2 views x {crops:,} crops per worker x 31,968 bytes"):
        fc.check_run_token_cache(uri, mcfg, S, over, points=True)
    fc.check_run_token_cache(uri, mcfg, S, TrainConfig(cache_views=2), points=True)  # auto: worker


def test_worker_refuses_before_encoding(tmp_path, demo_dataset):
    """Each worker checks against its node (here: an explicit limit) before reading rows."""
    from exits.config import TrainConfig
    from exits.data.coco import write_table
    from exits.train.data import ShardedInstances
    from exits.train.loops import _encode_views

    table, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    write_table(table, str(tmp_path / "t.parquet"))
    src = ShardedInstances(str(tmp_path / "t.parquet"), demo_dataset["images"], CropSpec(S, True))
    _, teacher, _ = _models(False)
    tcfg = TrainConfig(cache_views=3, cache_max_gb=1e-6)  # 1,000 bytes
    rows = -(-table.num_rows // 2)
    with pytest.raises(ValueError, match=f"3 views x {rows:,} crops per worker x 31,968 bytes"):
        _encode_views(teacher, None, src, tcfg, RetrievalConfig(), LossConfig(), torch.device("cpu"),
                      False, 0, 2, workers_on_node=1)  # fmt: skip
