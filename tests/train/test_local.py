"""The stage-1 step both loops share (``loops.train_step``) and the single-process runner
(``exits.train.local``): known answers for one AdamW step and the EMA, and a 1a -> 1b run."""

from __future__ import annotations

import copy

import pytest
import torch

from exits.checkpoints import load_model
from exits.config import CropConfig, LossConfig, ModelConfig, RetrievalConfig, TrainConfig
from exits.data.coco import write_table
from exits.data.prepare import load_instances
from exits.method.crf import build_crf
from exits.model.generator import build_generator, build_similarity_extractor, make_teacher
from exits.train import steps
from exits.train.data import CropDataset, CropSpec
from exits.train.local import fit_local
from exits.train.loops import StepParts, loop_config, train_step, warmup_cosine

S, LR, WD = 96, 1e-3, 0.05


@pytest.fixture(scope="module")
def table(demo_dataset):
    inst, err = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    assert err.num_rows == 0
    return inst


def _batch(table, images, n=4):
    ds = CropDataset(table, images, CropSpec(size=S, train=True), seed=1)
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def _parts(stage, model, teacher=None, extractor=None, momentum=0.9):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    sched = warmup_cosine(opt, warmup=2, total=10)
    rcfg = RetrievalConfig(similarity="spatial", threshold_rule="relative")
    lcfg = LossConfig(balanced_bce=1.0)
    crf = build_crf("torch") if stage == "generator" else None
    return StepParts(stage, model, model, teacher, extractor, opt, sched, rcfg, lcfg, crf,
                     torch.device("cpu"), False, torch.Generator().manual_seed(0), False,
                     momentum)  # fmt: skip


def test_train_step_is_one_adamw_step_of_the_objective(table, demo_dataset):
    """1a: after one step every trainable p = p0 (1 - lr wd) - lr g / (|g| + eps) (AdamW's first
    step: bias-corrected m = g, v = g²), g the gradient of ``warmup_loss`` at p0; the schedule
    moved to its second value (warm-up 2: lr x 1/2 -> lr x 1)."""
    torch.manual_seed(0)
    model = build_similarity_extractor("vit_tiny_demo", img_size=S, freeze=False).train()
    batch = _batch(table, demo_dataset["images"])
    ref = copy.deepcopy(model)
    loss, _ = steps.warmup_loss(ref, batch, LossConfig())
    loss.backward()
    parts = _parts("warmup", model)
    parts.lcfg = LossConfig()
    lr0 = parts.scheduler.get_last_lr()[0]
    logs = train_step(parts, batch)
    assert logs["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert lr0 == pytest.approx(LR / 2) and parts.scheduler.get_last_lr()[0] == pytest.approx(LR)
    moved = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if q.grad is None:
            continue
        want = q.detach() * (1 - lr0 * WD) - lr0 * q.grad / (q.grad.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-6, msg=name)
        moved += 1
    assert moved > 10


def test_train_step_updates_the_teacher_by_ema(table, demo_dataset):
    """1b: teacher = m teacher0 + (1 - m) student1 for every parameter after the step."""
    torch.manual_seed(0)
    student = build_generator("vit_tiny_demo", img_size=S)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)
    before = copy.deepcopy(teacher)
    parts = _parts("generator", student, teacher, momentum=0.9)
    logs = train_step(parts, _batch(table, demo_dataset["images"]))
    assert {"loss", "loss_point", "loss_crf"} <= set(logs)
    for t, t0, s in zip(
        teacher.parameters(), before.parameters(), student.parameters(), strict=True
    ):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s.detach())


@pytest.mark.slow
def test_fit_local_warmup_then_generator(table, demo_dataset, tmp_path):
    """1a -> 1b on one device without Ray: steps as configured, history rows, self-describing
    model.pt files; ``max_seconds=0`` stops after the first step."""
    uri = str(tmp_path / "instances.parquet")
    write_table(table, uri)
    crop = CropConfig(size=S)
    model = ModelConfig(generator="vit_tiny_demo", attention_block=1)
    retr = RetrievalConfig(similarity="attention", threshold_rule="relative")
    loss = LossConfig(balanced_bce=1.0)
    tc = TrainConfig(epochs=50, max_steps=2, batch_size=2, lr=1e-4, scale_lr=False)

    def cfg(stage, ckpt=None, mc=model, **train):
        t = TrainConfig(**{**tc.__dict__, **train})
        return loop_config(stage, uri, demo_dataset["images"], crop, mc, retr, loss, t,
                           extractor_checkpoint=ckpt, loader_workers=0)  # fmt: skip

    w = fit_local(cfg("warmup"), "cpu", out=str(tmp_path / "warmup"))
    assert w.steps == 2 and [h["step"] for h in w.history] == [1, 2]
    assert all(h["step_s"] > 0 and h["samples_per_s"] > 0 for h in w.history)
    _, meta = load_model(w.model_uri)
    assert meta["kind"] == "extractor" and meta["builder_kwargs"]["attention_block"] == 1
    g = fit_local(cfg("generator", w.model_uri), "cpu", out=str(tmp_path / "generator"))
    assert g.steps == 2 and not g.stopped_early
    assert {"loss_point", "loss_crf", "retrieved_fg", "lr"} <= set(g.history[-1])
    _, meta = load_model(g.model_uri)
    assert meta["kind"] == "generator" and meta["meta"]["step"] == 2
    frozen = ModelConfig(generator="vit_tiny_demo", attention_block=1, trainable_blocks=0)
    cached = fit_local(cfg("generator", w.model_uri, frozen, cache_views=1), "cpu", max_seconds=0.0)
    assert cached.steps == 1 and cached.stopped_early and cached.model_uri is None
