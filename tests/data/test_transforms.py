"""exits.data.transforms: tensor conversion, normalisation, the student augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from exits.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, student_augment, to_tensor

B, S = 64, 8


def _draws(seed: int) -> list[torch.Tensor]:
    """The six per-sample uniforms student_augment takes, in its order: jitter?, brightness,
    contrast, saturation, grayscale?, blur?"""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, generator=g) for _ in range(6)]


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(seed))


def test_to_tensor_and_normalize_known_values():
    crops = np.zeros((1, 2, 2, 3), np.uint8)
    crops[0, 0, 1] = (255, 0, 51)
    t = to_tensor(crops)  # (1, 3, 2, 2)
    assert t.shape == (1, 3, 2, 2) and t[0, :, 0, 1].tolist() == pytest.approx([1.0, 0.0, 0.2])
    n = normalize(t)
    expect = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.2), IMAGENET_MEAN, IMAGENET_STD)]
    assert n[0, :, 0, 1].tolist() == pytest.approx(expect)


def test_student_augment_is_deterministic_with_a_seed():
    x = _images()
    a = student_augment(x, torch.Generator().manual_seed(3))
    b = student_augment(x, torch.Generator().manual_seed(3))
    c = student_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(x, _images())  # the input is not modified
    assert a.min() >= 0 and a.max() <= 1


def test_student_augment_known_branches():
    x = _images()
    out = student_augment(x, torch.Generator().manual_seed(0))
    jit, bright, _, _, gray, blur = _draws(0)
    jit, gray, blur = jit < 0.8, gray < 0.2, blur < 0.5
    # every branch combination occurs in 64 samples with this seed
    assert (~jit & ~gray & ~blur).any() and (~jit & ~gray & blur).any() and gray.any()

    for i in torch.nonzero(~jit & ~gray & ~blur).flatten():  # untouched
        assert torch.equal(out[i], x[i])
    k = np.array([1.0, 2.0, 1.0], np.float32)
    for i in torch.nonzero(~jit & ~gray & blur).flatten():  # [1 2 1]²/16 blur, replicated edge
        img = x[i].permute(1, 2, 0).numpy()
        ref = cv2.sepFilter2D(img, -1, k / 4, k / 4, borderType=cv2.BORDER_REPLICATE)
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    for i in torch.nonzero(gray & ~blur).flatten():  # grayscale: three equal channels
        assert torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 1], out[i, 2])

    # a flat grey image only sees the brightness factor 1 + 0.8·(u − 0.5) (contrast,
    # saturation, grayscale and blur leave it flat), clamped to [0, 1]
    flat = torch.full((B, 3, S, S), 0.5)
    out = student_augment(flat, torch.Generator().manual_seed(0))
    want = torch.where(jit, (0.5 * (1 + 0.8 * (bright - 0.5))).clamp(0, 1), torch.tensor(0.5))
    torch.testing.assert_close(out[:, :, 0, 0], want[:, None].expand(B, 3))
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))  # still flat
