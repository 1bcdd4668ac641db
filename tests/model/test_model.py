"""Tests for exits.model: attention extraction, generator shapes and gradients, EMA, weights."""

import io

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from exits.config import RetrievalConfig
from exits.method.losses import point_loss
from exits.method.retrieval import (
    GridGeometry,
    initial_points,
    retrieve_from_transition,
    retrieved_count,
    transition_matrix,
)
from exits.model import (
    ATTENTION_BLOCKS,
    MaskDecoder,
    PseudoLabelGenerator,
    block_attention,
    build_generator,
    build_similarity_extractor,
    build_vit,
    ema_update,
    load_encoder_state,
    make_teacher,
)

IMG = 32  # tiny crops keep the tests fast (demo builder: patch 8 → 4×4 grid)


def _tiny_encoder(img_size: int = IMG):
    torch.manual_seed(0)
    return build_vit(
        "vit_tiny_patch16_224", img_size=img_size, patch_size=8, embed_dim=48, depth=3, num_heads=3
    ).eval()


def test_block_attention_equals_manual_recomputation():
    enc = _tiny_encoder()
    x = torch.randn(2, 3, IMG, IMG)
    block = 1
    captured = {}
    attn_mod = enc.vit.blocks[block].attn
    hook = attn_mod.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        enc(x)  # a full normal forward; the hook records block 1's attention input
        got = block_attention(enc, x, block)
    hook.remove()
    h = captured["x"]  # (B, T, D) = norm1 output
    B, T, D = h.shape
    heads, hd = attn_mod.num_heads, D // attn_mod.num_heads
    qkv = h @ attn_mod.qkv.weight.T + attn_mod.qkv.bias  # (B, T, 3D)
    q = qkv[..., :D].reshape(B, T, heads, hd).transpose(1, 2)  # (B, heads, T, hd)
    k = qkv[..., D : 2 * D].reshape(B, T, heads, hd).transpose(1, 2)
    manual = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1).mean(1)[:, 1:, 1:]
    assert got.shape == (2, 16, 16)
    assert torch.allclose(got, manual, atol=1e-5)
    # rows no longer sum to 1 after the cls column is dropped
    assert (got.sum(-1) < 1).all() and (got.sum(-1) > 0.5).all()


def test_block_attention_equals_timm_unfused_softmax():
    enc = _tiny_encoder()
    x = torch.randn(2, 3, IMG, IMG)
    attn_mod = enc.vit.blocks[2].attn
    attn_mod.fused_attn = False  # timm then materialises softmax(q kᵀ) before attn_drop
    seen = {}
    hook = attn_mod.attn_drop.register_forward_hook(lambda m, a, out: seen.update(w=out))
    with torch.no_grad():
        enc(x)
        got = block_attention(enc, x, 2)
    hook.remove()
    assert torch.allclose(got, seen["w"].mean(1)[:, 1:, 1:], atol=1e-6)
    with pytest.raises(IndexError):
        block_attention(enc, x, 3)


def test_generator_output_shape_stride_4():
    gen = build_generator("vit_tiny_demo", img_size=IMG)
    assert gen(torch.randn(2, 3, IMG, IMG)).shape == (2, 1, IMG // 4, IMG // 4)
    # patch 16 (paper layout): the decoder gives 2N = S/8, resized to S/4
    enc = build_vit(
        "vit_base_patch16_224", img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3
    )
    paper_like = PseudoLabelGenerator(encoder=enc, decoder=MaskDecoder(in_dim=48, hidden_dim=32))
    assert paper_like(torch.randn(1, 3, 64, 64)).shape == (1, 1, 16, 16)


def test_gradients_reach_generator_not_frozen_extractor():
    torch.manual_seed(0)
    gen = build_generator("vit_tiny_demo", img_size=IMG)
    ext = build_similarity_extractor("vit_tiny_demo", img_size=IMG)
    assert ext.attention_block == ATTENTION_BLOCKS["vit_tiny_demo"] and not ext.training
    x = torch.randn(2, 3, IMG, IMG)
    grid = gen.grid
    T = transition_matrix(ext.similarity(x))  # (B, n, n)
    assert not T.requires_grad
    pts = torch.tensor([[2.0, 0.5], [0.5, 2.0], [2.0, 3.5], [3.5, 2.0]]).expand(2, 4, 2)
    box = torch.tensor([[0.5, 0.5, 3.5, 3.5]]).expand(2, 4)
    fg, bg, in_box = initial_points(pts, box, grid, delta=0.5)
    # the paper's thresholds, scaled from 1024 tokens to grid²
    labels = retrieve_from_transition(T, GridGeometry(fg, bg, in_box, grid), RetrievalConfig())
    probs = gen(x).sigmoid()  # (B, 1, S/4, S/4)
    box_mask = torch.ones(2, IMG // 4, IMG // 4)
    loss = point_loss(probs, labels, box_mask, retrieved_count(labels, fg, bg))
    loss.backward()
    assert all(p.grad is not None for p in gen.parameters())
    assert all(p.grad is None and not p.requires_grad for p in ext.parameters())


def test_ema_update():
    student = build_generator("vit_tiny_demo", img_size=IMG)
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, momentum=0.9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_ema_update_two_steps_known_values():
    student = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    teacher = make_teacher(student)
    with torch.no_grad():
        teacher[0].weight.fill_(0.0)
        student[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
    student[1].running_mean.fill_(3.0)
    ema_update(teacher, student, momentum=0.75)  # 0.75·0 + 0.25·s
    assert teacher[0].weight.tolist() == [[0.25, -0.5]]
    with torch.no_grad():
        student[0].weight.copy_(torch.tensor([[2.0, 2.0]]))
    ema_update(teacher, student, momentum=0.75)  # 0.75·(0.25, −0.5) + 0.25·(2, 2)
    assert teacher[0].weight.tolist() == [[0.6875, 0.125]]
    assert teacher[1].running_mean.item() == 3.0  # buffers are copied, not averaged
    assert student[0].weight.tolist() == [[2.0, 2.0]]  # the student is untouched


def test_mae_layout_checkpoint_loads_with_interpolated_pos_embed(tmp_path):
    src = _tiny_encoder(img_size=32)  # 4×4 grid
    state = {f"{k}": v.clone() for k, v in src.vit.state_dict().items()}
    mae = dict(state)
    mae["mask_token"] = torch.zeros(1, 1, 48)
    mae["decoder_embed.weight"] = torch.zeros(32, 48)
    mae["decoder_pos_embed"] = torch.zeros(1, 17, 32)
    mae["decoder_blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    buf = io.BytesIO()
    torch.save({"model": mae}, buf)

    dst = build_vit(
        "vit_tiny_patch16_224", img_size=48, patch_size=8, embed_dim=48, depth=3, num_heads=3
    )  # 6×6 grid
    load_encoder_state(dst, buf.getvalue())
    expected_pos = resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    assert dst.vit.pos_embed.shape == (1, 37, 48)
    assert torch.allclose(dst.vit.pos_embed, expected_pos)
    assert torch.equal(dst.vit.cls_token, state["cls_token"])
    assert torch.equal(dst.vit.blocks[2].attn.qkv.weight, state["blocks.2.attn.qkv.weight"])

    bad = io.BytesIO()
    torch.save({"model": {"blocks.0.foo": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError):
        load_encoder_state(dst, bad.getvalue())


def test_builders_load_checkpoints_from_paths(tmp_path):
    gen = build_generator("vit_tiny_demo", img_size=IMG)
    path = tmp_path / "gen.pt"
    torch.save({"state_dict": gen.state_dict()}, path)
    again = build_generator("vit_tiny_demo", checkpoint=str(path), img_size=IMG)
    for a, b in zip(gen.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # a generator checkpoint also loads into the extractor (same layout)
    ext = build_similarity_extractor("vit_tiny_demo", checkpoint=str(path), img_size=IMG)
    assert torch.equal(ext.encoder.vit.pos_embed, gen.encoder.vit.pos_embed)
    with pytest.raises(KeyError):
        build_generator("nope")


def test_checkpoint_with_pickled_args_needs_opt_in():
    import argparse

    enc = _tiny_encoder()
    buf = io.BytesIO()
    torch.save({"model": enc.vit.state_dict(), "args": argparse.Namespace(lr=1.0)}, buf)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_encoder_state(enc, buf.getvalue())
    load_encoder_state(enc, buf.getvalue(), allow_pickle=True)
