"""Self-describing model checkpoints: builder name + builder arguments + weights + metadata.

A checkpoint file is a ``torch.save`` dict that loads under ``weights_only=True``::

    {"format": "exits.model/1", "builder": "vit_tiny_demo", "kind": "generator",
     "builder_kwargs": {"img_size": 96}, "state_dict": {...}, "meta": {...}}

``kind`` is "generator" (EMA teacher weights of stage 1b) or "extractor" (stage 1a).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch
from torch import nn

from exits import storage

FORMAT = "exits.model/1"


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


def read_checkpoint(uri: str) -> dict[str, Any]:
    """The checkpoint dict at ``uri`` (weights included) plus ``id``, its content hash."""
    data = storage.read_bytes(uri)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{uri} is not an exits checkpoint (format {FORMAT})")
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
