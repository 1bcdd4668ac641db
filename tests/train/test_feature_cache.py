"""Frozen-encoder token cache (exits/train/feature_cache.py): the cached step computes the same
objective as the uncached one; batches are deterministic and resumable."""

from __future__ import annotations

import pytest
import torch

from exits.config import LossConfig, RetrievalConfig
from exits.data.coco import load_instances
from exits.method.crf import build_crf
from exits.model.generator import (
    build_generator,
    build_similarity_extractor,
    make_teacher,
    shares_frozen_encoder,
)
from exits.train import feature_cache as fc
from exits.train import steps
from exits.train.data import CropDataset, CropSpec

S, B = 96, 6


@pytest.fixture(scope="module")
def dataset(demo_dataset):
    table, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    return CropDataset(table, demo_dataset["images"], CropSpec(size=S, train=True), seed=3)


def _models(shared: bool):
    torch.manual_seed(0)
    student = build_generator("vit_tiny_demo", img_size=S, trainable_blocks=0)
    teacher = make_teacher(student)
    for p in teacher.decoder.parameters():  # a teacher that differs from the student
        p.data.add_(0.01 * torch.randn_like(p))
    extractor = build_similarity_extractor(
        "vit_tiny_demo", img_size=S, attention_block=1, trainable_blocks=0
    )
    if shared:
        extractor.load_state_dict(student.state_dict())
    assert shares_frozen_encoder(teacher, extractor) == shared
    return student, teacher, extractor


def test_forward_on_tokens_equals_forward_on_images(dataset):
    student, _, _ = _models(True)
    x = torch.randn(2, 3, S, S)
    assert torch.equal(student(x), student(tokens=student.encoder(x)))
    with pytest.raises(ValueError, match="exactly one"):
        student(x, tokens=student.encoder(x))


@pytest.mark.parametrize(
    "objective,similarity,shared",
    [("exits", "attention", True), ("exits", "attention", False), ("exits", "bilateral", False),
     ("box_only", "attention", True)],
)  # fmt: skip
def test_cached_step_equals_uncached_step(dataset, monkeypatch, objective, similarity, shared):
    """Same crops (view 0 = the dataset's epoch 0), no photometric augmentation, no dropout:
    the loss and the retrieval counts of the cached step equal the uncached step's (tokens are
    cached in fp16: losses to 1e-3), and so do the decoder gradients."""
    monkeypatch.setattr(steps, "student_augment", lambda images, generator=None: images)
    rcfg = RetrievalConfig(similarity=similarity, threshold_rule="relative", dropout=0.0)
    lcfg = LossConfig(objective=objective, lambda_mil=1.0, balanced_bce=1.0)
    crf = build_crf("torch", n_iters=lcfg.crf_iters)
    student, teacher, extractor = _models(shared)
    ext = extractor if similarity == "attention" else None
    dataset.set_epoch(0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(B)])
    loss_u, logs_u = steps.generator_loss(
        student, teacher, ext, batch, rcfg, lcfg, crf, None, shared
    )
    loss_u.backward()
    grads_u = [p.grad.clone() for p in student.decoder.parameters()]
    student.zero_grad()

    cache = fc.encode_views(teacher, ext, dataset, list(range(B)), 1, rcfg, lcfg, 4,
                         torch.device("cpu"), shared=shared)  # fmt: skip
    assert (
        cache["tokens"].shape == (B, (S // 8) ** 2, 96) and cache["tokens"].dtype == torch.float16
    )
    assert ("labels" in cache) == (objective == "exits")
    loss_c, logs_c = fc.cached_generator_loss(
        student, teacher, cache, rcfg, lcfg, crf, torch.device("cpu")
    )
    loss_c.backward()
    assert float(loss_c.detach()) == pytest.approx(float(loss_u.detach()), abs=1e-3)
    for key in ("retrieved_fg", "retrieved_bg", "no_retrieval_frac"):
        assert logs_c.get(key) == logs_u.get(key)
    for gu, p in zip(grads_u, student.decoder.parameters(), strict=True):
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
        assert torch.allclose(cache["tokens"][2 * v : 2 * v + 2].float(), tokens, atol=1e-2)
    assert not torch.equal(cache["tokens"][0], cache["tokens"][2])  # the views differ


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
