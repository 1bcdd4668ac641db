"""Tests for exits.method.crf: the exact pydensecrf CRF and the batched torch mean-field."""

import pytest
import torch

from exits.method.crf import PyDenseCRF, TorchMeanFieldCRF, build_crf

SIZE = 48


def _noisy_step_edge(seed: int = 0):
    """Left half dark, right half bright (noisy RGB); probs a weak noisy step (0.35 | 0.65)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    truth[:, SIZE // 2 :] = True
    level = torch.where(truth, 200.0, 60.0)
    image = level + 12 * torch.randn(3, SIZE, SIZE, generator=g)
    image = image.clamp(0, 255).round().to(torch.uint8)[None]  # (1, 3, H, W)
    probs = torch.where(truth, 0.65, 0.35) + 0.25 * torch.randn(SIZE, SIZE, generator=g)
    probs = probs.clamp(0.01, 0.99)[None, None]  # (1, 1, H, W)
    return image, probs, truth


def test_torch_crf_agrees_with_pydensecrf_on_step_edge():
    pytest.importorskip("pydensecrf.densecrf")
    image, probs, truth = _noisy_step_edge()
    exact = build_crf("pydensecrf")(image, probs)
    local = build_crf("torch")(image, probs)
    assert exact.shape == local.shape == (1, 1, SIZE, SIZE)
    agree = ((exact > 0.5) == (local > 0.5)).float().mean().item()
    assert agree >= 0.95
    # and both actually refine: better than thresholding the noisy input
    noisy_acc = ((probs[0, 0] > 0.5) == truth).float().mean().item()
    for out in (exact, local):
        acc = ((out[0, 0] > 0.5) == truth).float().mean().item()
        assert acc > noisy_acc and acc >= 0.95


def test_pydensecrf_accepts_float_images_and_batches():
    pytest.importorskip("pydensecrf.densecrf")
    image, probs, _ = _noisy_step_edge()
    crf = PyDenseCRF()
    a = crf(image, probs)
    b = crf(image.float() / 255, probs)  # float in [0, 1] means the same image
    assert torch.allclose(a, b, atol=1e-5)
    batch = crf(torch.cat([image, image]), torch.cat([probs, probs]))
    assert torch.allclose(batch[1:], a, atol=1e-5)


def test_torch_crf_batched_equals_per_sample():
    im0, p0, _ = _noisy_step_edge(0)
    im1, p1, _ = _noisy_step_edge(1)
    crf = TorchMeanFieldCRF(kernel_size=3, dilation=2)
    both = crf(torch.cat([im0, im1]), torch.cat([p0, p1]))
    assert torch.allclose(both[:1], crf(im0, p0), atol=1e-6)
    assert torch.allclose(both[1:], crf(im1, p1), atol=1e-6)


def test_torch_crf_keeps_a_uniform_scene():
    image = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)
    probs = torch.full((2, 1, 8, 8), 0.5)
    out = TorchMeanFieldCRF()(image, probs)
    assert torch.allclose(out, probs, atol=1e-6)


def test_crf_validates_inputs():
    with pytest.raises(KeyError):
        build_crf("nope")
    with pytest.raises(ValueError):
        TorchMeanFieldCRF(kernel_size=4)
    with pytest.raises(ValueError):
        TorchMeanFieldCRF()(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 4, 4))
