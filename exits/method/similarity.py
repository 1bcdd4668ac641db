"""Similarity sources S (B, n, n) behind the transition matrix (paper Sec. 3.2.1 and the
training-free kernels of the from-scratch profile, docs/architecture.md).

The paper's source is the attention of the warmed-up similarity extractor ("attention");
"bilateral" (patch-mean CIELAB colour + position), "spatial" (position only) and "tokens"
(pretrained patch-token affinity) need no training; "*_x_bilateral" multiply two sources.
Pick one by name from ``SIMILARITY_SOURCES`` through ``compute_similarity``.

Conventions: an N×N patch grid flattened row-major (``n = N²``), positions in patch cells,
crops RGB (B, 3, S, S) uint8 in [0, 255] or float in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from exits.config import RetrievalConfig

# sRGB (D65) → CIE XYZ, and the D65 white point, for the CIELAB conversion.
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.950456, 1.0, 1.088754)
_LAB_EPSILON = (6.0 / 29.0) ** 3
_LAB_KAPPA = (29.0 / 6.0) ** 2 / 3.0
_LAB_OFFSET = 4.0 / 29.0
UINT8_MAX = 255.0

# Kernel defaults: defined once, in RetrievalConfig (θα = 1.5 cells, θβ = 10 Lab units).
THETA_POS = RetrievalConfig.bilateral_theta_pos
THETA_COL = RetrievalConfig.bilateral_theta_col
TOKEN_TEMPERATURE = RetrievalConfig.token_temperature


def patch_centres(grid: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(n,) x and y of patch centres in patch units, row-major."""
    c = torch.arange(grid, device=device, dtype=dtype) + 0.5
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    return cx.reshape(-1), cy.reshape(-1)


def _to_unit_rgb(crops: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] RGB → float32 in [0, 1]."""
    if crops.dtype == torch.uint8:
        return crops.float() / UINT8_MAX
    return crops.float()


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB (B, 3, H, W) float in [0, 1] → CIELAB (B, 3, H, W) (D65; L in [0, 100])."""
    # kept by hand: batched torch on the training device; cv2.cvtColor is numpy, CPU, per image
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_D65_WHITE, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white[None, :, None, None]
    f = torch.where(
        xyz > _LAB_EPSILON, xyz.clamp_min(_LAB_EPSILON) ** (1 / 3), xyz * _LAB_KAPPA + _LAB_OFFSET
    )
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def _grid_sq_dist(grid: int, device: torch.device | None = None) -> Tensor:
    """(n, n) squared distance between patch centres, in cells."""
    cx, cy = patch_centres(grid, device or torch.device("cpu"), torch.float32)
    pos = torch.stack([cx, cy], -1)  # (n, 2)
    return torch.cdist(pos, pos).square()


def spatial_similarity(grid: int, theta_pos: float = THETA_POS, device=None) -> Tensor:
    """Gaussian distance kernel exp(−|Δp|² / 2θα²) on patch centres (cells).

    Returns:
        (n, n) float32, the same for every crop (callers expand to (B, n, n)).
    """
    return torch.exp(-_grid_sq_dist(grid, device) / (2 * theta_pos**2))


def bilateral_similarity(
    crops: Tensor, grid: int, theta_pos: float = THETA_POS, theta_col: float = THETA_COL
) -> Tensor:
    """Training-free bilateral kernel on patch-mean CIELAB colour.

    K(i, j) = exp(−|p_i − p_j|² / 2θα² − |Lab_i − Lab_j|² / 2θβ²), positions in cells.

    Args:
        crops: (B, 3, S, S) RGB, uint8 in [0, 255] or float in [0, 1] (not normalised).
        grid: N; colours are averaged over each patch (adaptive average pooling).

    Returns:
        (B, n, n) float32.
    """
    lab = F.adaptive_avg_pool2d(rgb_to_lab(_to_unit_rgb(crops)), grid)  # (B, 3, N, N)
    lab = lab.flatten(2).transpose(1, 2)  # (B, n, 3)
    col_d2 = torch.cdist(lab, lab).square()  # (B, n, n)
    pos_d2 = _grid_sq_dist(grid, crops.device)  # (n, n)
    return torch.exp(-pos_d2 / (2 * theta_pos**2) - col_d2 / (2 * theta_col**2))


def token_similarity(tokens: Tensor, temperature: float = TOKEN_TEMPERATURE) -> Tensor:
    """Affinity of pretrained patch tokens: exp((cos(t_i, t_j) − 1) / temperature).

    In (0, 1], 1 on the diagonal; a sharper kernel for smaller ``temperature``.

    Args:
        tokens: (B, n, D) patch tokens (e.g. a pretrained ViT's output after the final norm).

    Returns:
        (B, n, n) float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = F.normalize(tokens.float(), dim=-1)
    return torch.exp((t @ t.transpose(1, 2) - 1.0) / temperature)


SimilarityFn = Callable[..., Tensor]


def _attention_source(*, attention_fn, normalised, **_) -> Tensor:
    if attention_fn is None or normalised is None:
        raise ValueError("the 'attention' source needs attention_fn and normalised images")
    return attention_fn(normalised)


def _tokens_source(*, tokens_fn, normalised, token_temperature=TOKEN_TEMPERATURE, **_) -> Tensor:
    if tokens_fn is None or normalised is None:
        raise ValueError("the 'tokens' source needs tokens_fn and normalised images")
    return token_similarity(tokens_fn(normalised), token_temperature)


def _bilateral_source(*, rgb, grid, theta_pos=THETA_POS, theta_col=THETA_COL, **_) -> Tensor:
    return bilateral_similarity(rgb, grid, theta_pos, theta_col)


def _spatial_source(*, rgb, grid, theta_pos=THETA_POS, **_) -> Tensor:
    k = spatial_similarity(grid, theta_pos, device=rgb.device)
    return k.expand(rgb.shape[0], -1, -1)


def _attention_x_bilateral_source(**kwargs) -> Tensor:
    return _attention_source(**kwargs) * _bilateral_source(**kwargs)


def _tokens_x_bilateral_source(**kwargs) -> Tensor:
    return _tokens_source(**kwargs) * _bilateral_source(**kwargs)


SIMILARITY_SOURCES: dict[str, SimilarityFn] = {
    "attention": _attention_source,
    "bilateral": _bilateral_source,
    "spatial": _spatial_source,
    "attention_x_bilateral": _attention_x_bilateral_source,
    "tokens": _tokens_source,
    "tokens_x_bilateral": _tokens_x_bilateral_source,
}
# sources that need the (warmed-up, frozen) similarity extractor of stage 1a
EXTRACTOR_SOURCES = frozenset(
    {"attention", "attention_x_bilateral", "tokens", "tokens_x_bilateral"}
)


def compute_similarity(
    source: str,
    *,
    rgb: Tensor,
    grid: int,
    normalised: Tensor | None = None,
    attention_fn: Callable[[Tensor], Tensor] | None = None,
    theta_pos: float = THETA_POS,
    theta_col: float = THETA_COL,
    tokens_fn: Callable[[Tensor], Tensor] | None = None,
    token_temperature: float = TOKEN_TEMPERATURE,
) -> Tensor:
    """Similarity S (B, n, n) from a named source in ``SIMILARITY_SOURCES``.

    Args:
        source: "attention" (paper), "bilateral", "spatial", "attention_x_bilateral",
            "tokens" (pretrained patch-token affinity) or "tokens_x_bilateral".
        rgb: (B, 3, S, S) RGB crops, uint8 or float in [0, 1].
        grid: N.
        normalised: (B, 3, S, S) model input (needed by attention sources).
        attention_fn: images → (B, n, n), e.g. ``SimilarityExtractor.similarity``.
        tokens_fn: images → (B, n, D) patch tokens, e.g. ``SimilarityExtractor.tokens``.
    """
    if source not in SIMILARITY_SOURCES:
        raise KeyError(f"unknown similarity source {source!r}; have {sorted(SIMILARITY_SOURCES)}")
    return SIMILARITY_SOURCES[source](
        rgb=rgb,
        grid=grid,
        normalised=normalised,
        attention_fn=attention_fn,
        theta_pos=theta_pos,
        theta_col=theta_col,
        tokens_fn=tokens_fn,
        token_temperature=token_temperature,
    )
