"""Self-describing model checkpoints: builder name + builder arguments + weights + metadata.

A checkpoint file is a ``torch.save`` dict that loads under ``weights_only=True``::

    {"format": "exits.model/1", "builder": "vit_tiny_demo", "kind": "generator",
     "builder_kwargs": {"img_size": 96}, "state_dict": {...}, "meta": {...}}

``kind`` is "generator" (EMA teacher weights of stage 1b) or "extractor" (stage 1a).
"""

from __future__ import annotations

import hashlib
import io
import reprlib
from typing import Any

import torch
from torch import nn

from exits import storage

FORMAT = "exits.model/1"
KINDS = ("generator", "extractor")
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 2048  # crop side S a checkpoint may ask for (paper: 512)
MAX_BLOCKS = 64  # attention_block / trainable_blocks bound (ViT-B has 12)
# builder arguments a checkpoint may carry; anything else (read, checkpoint, ...) is refused
BUILDER_KWARGS = ("img_size", "attention_block", "trainable_blocks", "encoder_checkpoint",
                  "pretrained")  # fmt: skip


def checkpoint_bytes(
    model: nn.Module,
    builder: str,
    kind: str,
    builder_kwargs: dict | None = None,
    meta: dict | None = None,
) -> bytes:
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {"format": FORMAT, "builder": builder, "kind": kind, "builder_kwargs": dict(builder_kwargs or {}),
         "state_dict": state, "meta": dict(meta or {})},
        buf,
    )  # fmt: skip
    return buf.getvalue()


def save_model(
    uri: str,
    model: nn.Module,
    builder: str,
    kind: str,
    builder_kwargs: dict | None = None,
    meta: dict | None = None,
) -> str:
    """Write a self-describing checkpoint to ``uri`` (local or s3); returns its content id."""
    data = checkpoint_bytes(model, builder, kind, builder_kwargs, meta)
    storage.publish_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()[:12]


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_checkpoint(obj: Any, uri: str = "checkpoint", kind: str | None = None) -> dict:
    """Check a checkpoint dict's description before any model is built (fail fast: before
    Ray starts): the format, ``kind`` (one of :data:`KINDS`; ``kind`` given: that one), a
    registered ``builder`` and ``builder_kwargs`` limited to :data:`BUILDER_KWARGS` with
    ``img_size`` an int in [MIN_IMG_SIZE, MAX_IMG_SIZE], a multiple of the generator's output
    stride (a checkpoint saying 1e6 sized crop tasks at 2.73 TiB). Returns ``obj``; raises
    ``ValueError`` naming the field (values cut short)."""
    from exits.model.generator import GENERATORS, OUTPUT_STRIDE

    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{uri} is not an exits checkpoint (format {FORMAT})")
    got = obj.get("kind")
    if got not in KINDS:
        raise ValueError(f"{uri}: kind {_short(got)} is not one of {KINDS}")
    if kind is not None and got != kind:
        raise ValueError(f"{uri} is a {got!r} checkpoint, not a {kind}")
    if obj.get("builder") not in GENERATORS:
        raise ValueError(
            f"{uri}: unknown builder {_short(obj.get('builder'))}; have {sorted(GENERATORS)}"
        )
    kwargs = obj.get("builder_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{uri}: builder_kwargs must be a mapping, got {type(kwargs).__name__}")
    unknown = sorted(str(k)[:40] for k in kwargs if k not in BUILDER_KWARGS)
    if unknown:
        raise ValueError(f"{uri}: builder_kwargs {unknown} not allowed; allowed {BUILDER_KWARGS}")
    size = kwargs.get("img_size")
    if size is not None and not (
        _int_in(size, MIN_IMG_SIZE, MAX_IMG_SIZE) and size % OUTPUT_STRIDE == 0
    ):
        raise ValueError(
            f"{uri}: builder_kwargs.img_size = {_short(size)} must be an int in "
            f"[{MIN_IMG_SIZE}, {MAX_IMG_SIZE}], a multiple of {OUTPUT_STRIDE}"
        )
    for key, low in (("attention_block", 0), ("trainable_blocks", -1)):
        v = kwargs.get(key)
        if v is not None and not _int_in(v, low, MAX_BLOCKS):
            raise ValueError(
                f"{uri}: builder_kwargs.{key} = {_short(v)} must be an int in [{low}, {MAX_BLOCKS}]"
            )
    enc = kwargs.get("encoder_checkpoint")
    if enc is not None and not isinstance(enc, str):
        raise ValueError(f"{uri}: builder_kwargs.encoder_checkpoint must be a string or None")
    return obj


def _short(value: Any) -> str:
    return reprlib.repr(value)


def read_checkpoint(uri: str, kind: str | None = None) -> dict[str, Any]:
    """The checkpoint dict at ``uri`` (weights included) plus ``id``, its content hash; its
    description is checked (:func:`check_checkpoint`, ``kind``: the kind it must be)."""
    data = storage.read_bytes(uri)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    check_checkpoint(obj, uri, kind)
    obj["id"] = hashlib.sha256(data).hexdigest()[:12]
    return obj


def load_model(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights.

    Returns:
        (model in eval mode on ``device``, the checkpoint dict without ``state_dict``) — the
        dict's ``id`` is a content hash usable as the generator id in outputs.
    """
    from exits.model.generator import build_generator, build_similarity_extractor

    obj = read_checkpoint(uri)
    kwargs = dict(obj.get("builder_kwargs") or {})
    kwargs["pretrained"] = False  # the state dict below holds every weight
    if obj["kind"] == "extractor":
        model = build_similarity_extractor(obj["builder"], freeze=True, **kwargs)
    else:
        kwargs.pop("attention_block", None)
        model = build_generator(obj["builder"], **kwargs)
    model.load_state_dict(obj.pop("state_dict"), strict=True)
    return model.to(device).eval(), obj
