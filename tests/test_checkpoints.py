"""exits.checkpoints: self-describing save/load round trip and ``weights_only`` refusal."""

from __future__ import annotations

import hashlib
import io
import pickle

import pytest
import torch

from exits.checkpoints import FORMAT, load_model, read_checkpoint, save_model
from exits.model.generator import build_generator, build_similarity_extractor

IMG = 32  # demo builder: patch 8 -> 4×4 grid


class Foreign:
    """A class no allow-list knows: unpickling it would run arbitrary code paths."""

    def __init__(self) -> None:
        self.x = 1


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_generator_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_generator("vit_tiny_demo", img_size=IMG, pretrained=False)
    uri = str(tmp_path / "model.pt")
    cid = save_model(uri, model, "vit_tiny_demo", "generator", {"img_size": IMG}, {"step": 7})
    assert cid == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()[:12]
    loaded, info = load_model(uri)
    assert _same_weights(model, loaded) and not loaded.training
    assert type(loaded) is type(model)
    assert info["format"] == FORMAT and info["kind"] == "generator" and info["id"] == cid
    assert info["builder"] == "vit_tiny_demo" and info["builder_kwargs"] == {"img_size": IMG}
    assert info["meta"] == {"step": 7} and "state_dict" not in info
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))  # (2, 1, 8, 8): same function


def test_extractor_round_trip_keeps_its_block(tmp_path):
    torch.manual_seed(1)
    ext = build_similarity_extractor(
        "vit_tiny_demo", attention_block=2, freeze=False, img_size=IMG, pretrained=False
    )
    uri = str(tmp_path / "ext.pt")
    save_model(uri, ext, "vit_tiny_demo", "extractor", {"img_size": IMG, "attention_block": 2})
    loaded, info = load_model(uri)
    assert info["kind"] == "extractor" and loaded.attention_block == 2
    assert _same_weights(ext, loaded)


def test_foreign_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "kind": "generator", "state_dict": {}, "x": Foreign()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Foreign"):
        read_checkpoint(str(path))
    # a plain torch.save of weights is not a checkpoint of ours either
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buf)
    (tmp_path / "plain.pt").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not an exits checkpoint"):
        read_checkpoint(str(tmp_path / "plain.pt"))
