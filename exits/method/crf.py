"""Dense CRF refinement of binary mask probabilities (used by the CRF loss, Eq. 9).

Two implementations share one interface, ``crf(images, probs) -> refined probs``:

- ``PyDenseCRF``: the exact fully connected CRF of Krähenbühl & Koltun (the paper's
  citation) through ``pydensecrf.densecrf`` on CPU, one sample at a time.
- ``TorchMeanFieldCRF``: a batched mean-field on a local window (MAL-style), usable on GPU.
  Each pairwise kernel is normalised over the window (as densecrf normalises its filters),
  so the compatibility weights mean roughly the same thing in both.

Conventions: images (B, 3, H, W) RGB, uint8 in [0, 255] or float in [0, 1] (not
normalised); probs (B, 1, H, W) foreground probability in [0, 1]; output (B, 1, H, W)
float32 foreground marginals on probs' device. Both run without gradient.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from exits.config import LossConfig

# Defaults of the pydensecrf README / DeepLab, bilateral spatial width given at 512 px.
GAUSSIAN_SXY = 3.0
GAUSSIAN_COMPAT = 3.0
BILATERAL_SXY_AT_REFERENCE = 80.0
REFERENCE_SIZE = 512
BILATERAL_SRGB = 13.0
BILATERAL_COMPAT = 10.0
N_ITERS = LossConfig.crf_iters  # mean-field iterations; defined once, in LossConfig
PROB_CLAMP = 1e-5
# Torch mean-field window.
KERNEL_SIZE = 5
DILATION = 1
UINT8_MAX = 255.0
KERNEL_EPS = 1e-8


class DenseCRF(Protocol):
    """images (B, 3, H, W) uint8/float RGB, probs (B, 1, H, W) → refined (B, 1, H, W)."""

    def __call__(self, images: Tensor, probs: Tensor) -> Tensor: ...


def _check_inputs(images: Tensor, probs: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if probs.dim() != 4 or probs.shape[1] != 1:
        raise ValueError(f"probs must be (B, 1, H, W), got {tuple(probs.shape)}")
    if images.shape[0] != probs.shape[0] or images.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"images {tuple(images.shape)} and probs {tuple(probs.shape)} must share B, H, W"
        )


def _rgb_255(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] → float32 in [0, 255]."""
    if images.dtype == torch.uint8:
        return images.float()
    return images.float() * UINT8_MAX


def scaled_bilateral_sxy(height: int, width: int) -> float:
    """Bilateral spatial width scaled from 80 px at 512² to the image size."""
    return BILATERAL_SXY_AT_REFERENCE * max(height, width) / REFERENCE_SIZE


class PyDenseCRF:
    """Exact fully connected CRF (pydensecrf), per sample on CPU.

    Args:
        n_iters: mean-field iterations.
        gaussian_sxy, gaussian_compat: appearance-free smoothness kernel (pixels).
        bilateral_sxy: bilateral spatial width in pixels; None = 80 px scaled by
            max(H, W) / 512.
        bilateral_srgb, bilateral_compat: bilateral colour width (0-255 units) and weight.
        num_threads: >1 runs samples in a thread pool. pydensecrf's ``inference`` does not
            release the GIL (Cython without ``nogil``), so threads do not help; the default
            is a plain loop.
    """

    def __init__(
        self,
        *,
        n_iters: int = N_ITERS,
        gaussian_sxy: float = GAUSSIAN_SXY,
        gaussian_compat: float = GAUSSIAN_COMPAT,
        bilateral_sxy: float | None = None,
        bilateral_srgb: float = BILATERAL_SRGB,
        bilateral_compat: float = BILATERAL_COMPAT,
        num_threads: int = 1,
    ) -> None:
        import pydensecrf.densecrf as dcrf  # fail fast when the optional dependency is absent

        self._dcrf = dcrf
        self.n_iters = n_iters
        self.gaussian_sxy = gaussian_sxy
        self.gaussian_compat = gaussian_compat
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.bilateral_compat = bilateral_compat
        self.num_threads = num_threads

    def refine_one(self, image: np.ndarray, prob: np.ndarray) -> np.ndarray:
        """image (H, W, 3) uint8, prob (H, W) float → refined FG marginal (H, W) float32."""
        h, w = prob.shape
        p = np.clip(prob.astype(np.float32), PROB_CLAMP, 1 - PROB_CLAMP)
        unary = -np.log(np.stack([1 - p, p]).reshape(2, -1))  # (2, H*W)
        crf = self._dcrf.DenseCRF2D(w, h, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        crf.addPairwiseGaussian(sxy=self.gaussian_sxy, compat=self.gaussian_compat)
        sxy = self.bilateral_sxy or scaled_bilateral_sxy(h, w)
        crf.addPairwiseBilateral(
            sxy=sxy,
            srgb=self.bilateral_srgb,
            rgbim=np.ascontiguousarray(image, dtype=np.uint8),
            compat=self.bilateral_compat,
        )
        q = np.asarray(crf.inference(self.n_iters), dtype=np.float32)  # (2, H*W)
        return q[1].reshape(h, w)

    @torch.no_grad()
    def __call__(self, images: Tensor, probs: Tensor) -> Tensor:
        _check_inputs(images, probs)
        rgb = _rgb_255(images).round().clamp(0, UINT8_MAX).to(torch.uint8)
        rgb_np = rgb.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        p_np = probs[:, 0].detach().float().cpu().numpy()  # (B, H, W)
        pairs = list(zip(rgb_np, p_np))
        if self.num_threads > 1:
            with ThreadPoolExecutor(self.num_threads) as pool:
                out = list(pool.map(lambda ip: self.refine_one(*ip), pairs))
        else:
            out = [self.refine_one(i, p) for i, p in pairs]
        return torch.from_numpy(np.stack(out))[:, None].to(probs.device)


def _window_sq_dist(kernel_size: int, dilation: int) -> Tensor:
    """(K,) squared pixel offset of each window position (unfold order, row-major)."""
    r = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
    dy, dx = torch.meshgrid(r * dilation, r * dilation, indexing="ij")
    return (dy.square() + dx.square()).reshape(-1)


class TorchMeanFieldCRF:
    """Batched mean-field CRF on a local (dilated) window, any device.

    Potts model with two kernels over the k×k window (centre excluded), each normalised to
    sum 1 per pixel: bilateral exp(−|Δp|²/2θα² − |ΔI|²/2θβ²) and spatial
    exp(−|Δp|²/2θγ²). For two labels the update is
    p ← sigmoid(logit(p₀) + Σ_j w(i, j)·(2 p_j − 1)). Window positions outside the image
    get weight 0. Uses ``F.unfold``: memory ≈ B·3·k²·H·W floats.

    Args:
        n_iters: mean-field iterations.
        kernel_size, dilation: the window (odd size; offsets are multiples of dilation).
        bilateral_sxy: θα in pixels; None = 80 px scaled by max(H, W) / 512.
        bilateral_srgb: θβ in 0-255 colour units. bilateral_compat: its weight.
        gaussian_sxy, gaussian_compat: θγ in pixels and its weight.
    """

    def __init__(
        self,
        *,
        n_iters: int = N_ITERS,
        kernel_size: int = KERNEL_SIZE,
        dilation: int = DILATION,
        gaussian_sxy: float = GAUSSIAN_SXY,
        gaussian_compat: float = GAUSSIAN_COMPAT,
        bilateral_sxy: float | None = None,
        bilateral_srgb: float = BILATERAL_SRGB,
        bilateral_compat: float = BILATERAL_COMPAT,
    ) -> None:
        if kernel_size % 2 != 1 or kernel_size < 3:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.n_iters = n_iters
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.pad = (kernel_size // 2) * dilation
        self.gaussian_sxy = gaussian_sxy
        self.gaussian_compat = gaussian_compat
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.bilateral_compat = bilateral_compat

    def _unfold(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, K, H, W) window values, zero outside the image."""
        b, c, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.pad)
        return cols.view(b, c, self.kernel_size**2, h, w)

    def pairwise_weights(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB → (B, K, H, W) combined window weights (K = k², centre 0)."""
        _, _, h, w = images.shape
        rgb = _rgb_255(images)  # (B, 3, H, W)
        sxy = self.bilateral_sxy or scaled_bilateral_sxy(h, w)
        pos_d2 = _window_sq_dist(self.kernel_size, self.dilation).to(rgb.device)  # (K,)
        pos_d2 = pos_d2[None, :, None, None]  # (1, K, 1, 1)
        valid = self._unfold(torch.ones(1, 1, h, w, device=rgb.device))[:, 0]  # (1, K, H, W)
        valid[:, self.kernel_size**2 // 2] = 0  # no self-interaction
        col_d2 = (self._unfold(rgb) - rgb[:, :, None]).square_().sum(1)  # (B, K, H, W)
        bil = valid * torch.exp(-pos_d2 / (2 * sxy**2) - col_d2 / (2 * self.bilateral_srgb**2))
        spa = valid * torch.exp(-pos_d2 / (2 * self.gaussian_sxy**2))  # (1, K, H, W)
        bil = bil / bil.sum(1, keepdim=True).clamp_min(KERNEL_EPS)
        spa = spa / spa.sum(1, keepdim=True).clamp_min(KERNEL_EPS)
        return self.bilateral_compat * bil + self.gaussian_compat * spa

    @torch.no_grad()
    def __call__(self, images: Tensor, probs: Tensor) -> Tensor:
        _check_inputs(images, probs)
        images = images.to(probs.device)
        weights = self.pairwise_weights(images)  # (B, K, H, W)
        p0 = probs.float().clamp(PROB_CLAMP, 1 - PROB_CLAMP)  # (B, 1, H, W)
        unary_logit = torch.log(p0) - torch.log1p(-p0)
        p = p0
        for _ in range(self.n_iters):
            neighbours = self._unfold(2 * p - 1)[:, 0]  # (B, K, H, W), 0 outside
            msg = (weights * neighbours).sum(1, keepdim=True)  # (B, 1, H, W)
            p = torch.sigmoid(unary_logit + msg)
        return p


CRF_KINDS = {"pydensecrf": PyDenseCRF, "torch": TorchMeanFieldCRF}


def build_crf(kind: str, **params) -> DenseCRF:
    """Build a CRF by kind: "pydensecrf" (exact, CPU) or "torch" (batched, any device)."""
    if kind not in CRF_KINDS:
        raise KeyError(f"unknown CRF kind {kind!r}; have {sorted(CRF_KINDS)}")
    return CRF_KINDS[kind](**params)
