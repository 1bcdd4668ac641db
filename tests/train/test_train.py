"""Stage-1 training: step functions (no Ray) and Ray Train fit/resume/fault recovery."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from exits.config import CropConfig, LossConfig, ModelConfig, RetrievalConfig, TrainConfig
from exits.data.coco import write_table
from exits.data.prepare import load_instances
from exits.method.retrieval import grid_geometry, retrieve, similarity_matrix
from exits.train.data import CropDataset, CropSpec
from exits.train.loops import STATE_FILE, param_groups, warmup_cosine

S = 96


@pytest.fixture(scope="module")
def table(demo_dataset):
    inst, err = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    assert err.num_rows == 0
    return inst


def _batch(table, images, train, n=8):
    ds = CropDataset(table, images, CropSpec(size=S, train=train, flip_prob=1.0 if train else 0.0))
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def test_crop_geometry_is_consistent_with_and_without_flip(table, demo_dataset):
    for train in (False, True):
        b = _batch(table, demo_dataset["images"], train)
        for i in range(8):
            pts = b["points"][i].numpy()
            x0, y0, x1, y1 = b["box"][i].numpy()
            # extreme points are pixel centres on the box sides: half an image pixel inside each
            # edge, the same distance on opposite sides (also after the flip swapped left/right)
            dl, dr = pts[1, 0] + 0.5 - x0, x1 - (pts[3, 0] + 0.5)
            dt, db = pts[0, 1] + 0.5 - y0, y1 - (pts[2, 1] + 0.5)
            assert dl > 0 and dl == pytest.approx(dr, abs=1e-4) and dl < (x1 - x0) / 2
            assert dt > 0 and dt == pytest.approx(db, abs=1e-4) and dt < (y1 - y0) / 2
            # the GT crop lies inside the box mask (up to resampling at the border)
            gt, bm = b["gt"][i].numpy(), b["box_mask"][i].numpy()
            assert (gt & ~bm).sum() <= 0.03 * max(gt.sum(), 1)


def _lrs(warmup: int, total: int, state: dict | None = None, start: int = 0) -> list[float]:
    """The lr used at each step start..total of ``warmup_cosine`` (base lr 1)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup, total)
    if state is not None:  # the loop's resume order: optimiser (holds the current lr), scheduler
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    out = []
    for _ in range(start, total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedule_known_values():
    lr = _lrs(10, 110)
    assert lr[0] == pytest.approx(0.1)  # linear warm-up: (t + 1) / warmup
    assert lr[4] == pytest.approx(0.5)
    assert lr[9] == pytest.approx(1.0) and lr[10] == pytest.approx(1.0)  # warm-up end
    assert lr[60] == pytest.approx(0.5)  # half-way through the cosine
    assert lr[35] == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
    assert lr[110] == pytest.approx(0.0, abs=1e-12)
    lr = _lrs(0, 4)  # no warm-up: cosine from the first step
    assert lr == pytest.approx(
        [1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 - np.cos(np.pi / 4)), 0.0]
    )
    assert _lrs(1, 3) == pytest.approx([1.0, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("trainable_blocks", [0, 2])
def test_param_groups_scale_the_encoder_blocks(trainable_blocks):
    """Fine-tuned encoder blocks at lr x encoder_lr_scale, the decoder at lr; frozen parameters
    in no group; the warm-up cosine scales both groups alike."""
    from exits.model.generator import build_generator

    model = build_generator("vit_tiny_demo", img_size=S, trainable_blocks=trainable_blocks)
    groups = param_groups(model, 1e-3, 0.1)
    assert len(groups) == 1 + (trainable_blocks > 0)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.decoder.parameters()}
    assert groups[0]["lr"] == 1e-3
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    if trainable_blocks:
        assert groups[1]["lr"] == pytest.approx(1e-4)
        blocks = model.encoder.vit.blocks[-trainable_blocks:]
        assert {id(p) for p in blocks.parameters()} <= {id(p) for p in groups[1]["params"]}
        opt = torch.optim.AdamW(groups, lr=1e-3)
        sched = warmup_cosine(opt, 4, 10)
        for _ in range(2):
            opt.step()
            sched.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([7.5e-4, 7.5e-5])


def test_lr_schedule_resumes_from_saved_state(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 5, 30)
    for _ in range(7):  # past the warm-up milestone
        opt.step()
        sched.step()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # as the loop resumes
    assert _lrs(5, 30, state, start=7) == pytest.approx(_lrs(5, 30)[7:])


def test_retrieval_switch_and_geometry(table, demo_dataset):
    b = _batch(table, demo_dataset["images"], False)
    grid = S // 8
    geo = grid_geometry(b, grid, delta=1.0)
    assert geo.fg.sum(1).min() >= 1 and geo.fg.sum(1).max() <= 4
    assert not (geo.fg & geo.bg).any() and not (geo.bg & geo.in_box).any()
    images = b["image"].float() / 255
    sim = similarity_matrix(
        "bilateral", b["image"], images, grid, None, RetrievalConfig(similarity="bilateral")
    )
    on = retrieve(sim, geo, RetrievalConfig(similarity="bilateral"))
    off = retrieve(sim, geo, RetrievalConfig(similarity="bilateral", enabled=False))
    pseudo = geo.in_box & ~geo.fg
    assert (on[pseudo] != -1).sum() > 0
    assert (off[pseudo] == -1).all()  # initial points only (paper Table 5 row 2)
    assert torch.equal(off[geo.fg], torch.ones_like(off[geo.fg])) and (off[geo.bg] == 0).all()


# ----------------------------------------------------------------------------- Ray Train
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The shared local Ray (tests/conftest.py)."""


def _cfgs(**train):
    t = dict(
        epochs=50,
        batch_size=4,
        lr=1e-4,
        scale_lr=False,
        num_workers=2,
        checkpoint_every=2,
        max_failures=0,
    )
    t.update(train)
    return (CropConfig(size=S), ModelConfig(generator="vit_tiny_demo", attention_block=1),
            RetrievalConfig(similarity="attention", threshold_rule="relative"),
            LossConfig(lambda_mil=1.0, balanced_bce=1.0, warmup_pairwise=1.0), TrainConfig(**t))  # fmt: skip


def _state(result):
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _adam_steps(state) -> set[int]:
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


@pytest.mark.slow
@pytest.mark.integration
def test_fit_resume_warmup_then_generator(ray_cluster, table, demo_dataset, tmp_path):
    from exits.train.loops import loop_config
    from exits.train.run import fit, publish_artifacts

    write_table(table, str(tmp_path / "instances.parquet"))
    crop, model, retr, loss, tcfg = _cfgs(max_steps=4)
    cfg = loop_config(
        "warmup",
        str(tmp_path / "instances.parquet"),
        demo_dataset["images"],
        crop,
        model,
        retr,
        loss,
        tcfg,
        loader_workers=0,
    )
    r1 = fit(cfg, tcfg, str(tmp_path / "warmup" / "ray"))
    s1 = _state(r1)
    assert s1["step"] == 4 and _adam_steps(s1) == {4}
    # a second fit with the same storage path + name resumes at step 4, optimiser state included
    tcfg.max_steps = 6
    cfg["train"]["max_steps"] = 6
    r2 = fit(cfg, tcfg, str(tmp_path / "warmup" / "ray"))
    s2 = _state(r2)
    assert s2["step"] == 6 and _adam_steps(s2) == {6}
    assert [h["step"] for h in s2["history"]] == [1, 2, 3, 4, 5, 6]
    publish_artifacts(r2, str(tmp_path / "warmup"))
    assert os.path.exists(tmp_path / "warmup" / "metrics.csv") and os.path.exists(
        tmp_path / "warmup" / "loss.png"
    )

    # 1b with the frozen 1a extractor's attention
    crop, model, retr, loss, tcfg = _cfgs(max_steps=3)
    cfg = loop_config("generator", str(tmp_path / "instances.parquet"), demo_dataset["images"], crop, model, retr, loss, tcfg,
                      extractor_checkpoint=str(tmp_path / "warmup" / "model.pt"), loader_workers=0)  # fmt: skip
    r3 = fit(cfg, tcfg, str(tmp_path / "generator" / "ray"))
    s3 = _state(r3)
    assert s3["step"] == 3 and "teacher" in s3
    h = s3["history"][-1]
    assert {"loss_point", "loss_crf", "retrieved_fg", "retrieved_bg", "samples_per_s"} <= set(h)
    # the teacher moved away from its initial copy (EMA updates happened) but is not the student
    assert any(
        not torch.equal(s3["teacher"][k], s3["model"][k])
        for k in s3["model"]
        if s3["model"][k].is_floating_point()
    )

    # 1b on cached encoder tokens (frozen encoder, 2 views): same history keys, 4 steps over
    # 2 epochs of 2 steps each (2 workers x batch 4 over the demo set's crops would be more:
    # capped), the encoder unchanged, the decoder trained
    crop, model, retr, loss, tcfg = _cfgs(max_steps=4, cache_views=2)
    model.trainable_blocks = 0
    cfg = loop_config("generator", str(tmp_path / "instances.parquet"), demo_dataset["images"], crop, model, retr, loss, tcfg,
                      extractor_checkpoint=str(tmp_path / "warmup" / "model.pt"), loader_workers=0)  # fmt: skip
    r4 = fit(cfg, tcfg, str(tmp_path / "generator_cached" / "ray"))
    s4 = _state(r4)
    assert s4["step"] == 4 and [h["step"] for h in s4["history"]] == [1, 2, 3, 4]
    assert {"loss_point", "loss_crf", "retrieved_fg", "retrieved_bg"} <= set(s4["history"][-1])
    enc = [k for k in s4["model"] if k.startswith("encoder.")]
    assert enc and all(torch.equal(s4["teacher"][k], s4["model"][k]) for k in enc)
    assert any(
        not torch.equal(s4["teacher"][k], s4["model"][k])
        for k in s4["model"]
        if k.startswith("decoder.")
    )


@pytest.mark.slow
@pytest.mark.integration
def test_worker_killed_is_recovered_from_checkpoint(ray_cluster, table, demo_dataset, tmp_path):
    from exits.train.loops import loop_config
    from exits.train.run import fit

    write_table(table, str(tmp_path / "instances.parquet"))
    crop, model, retr, loss, tcfg = _cfgs(max_steps=5, fail_at_step=3, max_failures=1)
    cfg = loop_config("warmup", str(tmp_path / "instances.parquet"), demo_dataset["images"], crop, model, retr, loss, tcfg,
                      marker_dir=str(tmp_path / "markers"), loader_workers=0)  # fmt: skip
    result = fit(cfg, tcfg, str(tmp_path / "ray"))
    assert result.error is None
    assert os.path.exists(tmp_path / "markers" / "fault-injected-step-3")  # the fault really fired
    state = _state(result)
    assert state["step"] == 5 and _adam_steps(state) == {5}
    # steps 1-2 come from before the crash (checkpoint at 2), 3-5 from the restarted group
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4, 5]
    assert np.isfinite(state["history"][-1]["loss"])
