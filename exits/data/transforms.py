"""Tensor conversion, normalisation and MAL-style augmentations for crops."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm/MAE ViTs are trained with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(crops: np.ndarray | Tensor) -> Tensor:
    """(B, S, S, 3) uint8 RGB (numpy or torch) -> (B, 3, S, S) float in [0, 1]."""
    t = torch.as_tensor(crops)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(images: Tensor) -> Tensor:
    """(B, 3, S, S) float in [0, 1] -> ImageNet-normalised (device/dtype preserved)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def student_augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """MAL's student-only photometric augmentations on (B, 3, S, S) floats in [0, 1].

    Colour jitter (brightness/contrast/saturation 0.4, p=0.8), grayscale (p=0.2) and Gaussian
    blur (p=0.5), each sampled per sample. Geometry is untouched (the flip is shared with the
    teacher and applied before this).
    """
    # kept by hand: torchvision's v2 ColorJitter/GaussianBlur draw one setting per call, not per
    # sample of a batch, and take no torch.Generator (no seeded, per-rank reproducibility)
    b = images.shape[0]
    dev = images.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    x = images
    jitter = (rand(b) < 0.8).view(b, 1, 1, 1)
    bright = 1 + (rand(b) - 0.5).mul(0.8).view(b, 1, 1, 1)
    contrast = 1 + (rand(b) - 0.5).mul(0.8).view(b, 1, 1, 1)
    sat = 1 + (rand(b) - 0.5).mul(0.8).view(b, 1, 1, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, S, S)
    y = x * bright
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) * contrast + y.mean(dim=(1, 2, 3), keepdim=True)
    g = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)
    y = (y - g) * sat + g
    x = torch.where(jitter, y.clamp(0, 1), x)
    to_gray = (rand(b) < 0.2).view(b, 1, 1, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = torch.where(to_gray, gray.expand_as(x), x)
    blur = (rand(b) < 0.5).view(b, 1, 1, 1)
    k = torch.tensor([1.0, 2.0, 1.0], device=dev, dtype=x.dtype)
    k = (k[:, None] * k[None, :]) / 16.0
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3
    )
    return torch.where(blur, blurred, x)
