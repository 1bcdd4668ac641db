"""Losses of the pseudo-label generator (paper Eq. 1, 6-10), one small function each.

Conventions: mask probabilities are sigmoid outputs in [0, 1]; ``box_mask`` is 1 inside the
box and 0 outside, at the same resolution as the mask it is compared with. Point labels are
the int8 grid labels of ``exits.method.retrieval`` (1 FG, 0 BG, -1 unlabelled), flattened
row-major over the N×N patch grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from exits.config import LossConfig

# MAL's dice smoothing: 1e-3 added to each squared sum.
DICE_EPS = 1e-3
# Balancing weights, defined once in LossConfig. The paper leaves them open; MAL uses
# λ_mil = 4, λ_crf = 0.5.
LAMBDA_MIL = LossConfig.lambda_mil
LAMBDA_CRF = LossConfig.lambda_crf
LAMBDA_POINT = LossConfig.lambda_point
# MAL binarises the CRF output at 0.5 before the dice loss.
CRF_TARGET_THRESHOLD = 0.5
BCE_CLAMP = 1e-6

Reduction = str  # "mean" | "none"


def _reduce(per_sample: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def dice_loss(
    pred: Tensor, target: Tensor, eps: float = DICE_EPS, reduction: Reduction = "mean"
) -> Tensor:
    """Dice loss in MAL's (squared, V-Net) form, per sample then averaged.

    L = 1 − 2·Σ p·t / (Σ p² + eps + Σ t² + eps), sums over all non-batch dimensions.

    Args:
        pred: (B, ...) probabilities.
        target: (B, ...) targets in [0, 1], same shape.
        reduction: "mean" → scalar; "none" → (B,).
    """
    p = pred.reshape(pred.shape[0], -1).float()  # (B, P)
    t = target.reshape(target.shape[0], -1).float()
    inter = (p * t).sum(1)
    denom = (p * p).sum(1) + eps + (t * t).sum(1) + eps
    return _reduce(1 - 2 * inter / denom, reduction)


def projection_mil_loss(
    mask_probs: Tensor, box_mask: Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """Eq. 1: L_mil = dice(Proj_x(M), Proj_x(Ŷ_box)) + dice(Proj_y(M), Proj_y(Ŷ_box)).

    Proj_x takes the max over each column (→ W values), Proj_y over each row (→ H values).

    Args:
        mask_probs: (B, H, W) or (B, 1, H, W) probabilities M.
        box_mask: same shape, the box area Ŷ_box in {0, 1}.
        reduction: "mean" → scalar; "none" → (B,).
    """
    m = mask_probs.reshape(mask_probs.shape[0], *mask_probs.shape[-2:])  # (B, H, W)
    y = box_mask.reshape(box_mask.shape[0], *box_mask.shape[-2:]).to(m.dtype)
    cols = dice_loss(m.amax(dim=1), y.amax(dim=1), reduction="none")  # (B,) over W
    rows = dice_loss(m.amax(dim=2), y.amax(dim=2), reduction="none")  # (B,) over H
    return _reduce(cols + rows, reduction)


def point_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 6-7: Ŷ = 1 on P_FG ∪ P̂_FG, K = 1 on every labelled point.

    Args:
        labels: (B, n) int8 grid labels.

    Returns:
        (Y_hat, K), each (B, n) float32.
    """
    return (labels == 1).float(), (labels != -1).float()


def downsample_to_grid(mask_probs: Tensor, grid: int) -> Tensor:
    """M → M̃: (B, 1, H, W) → (B, N²) by adaptive average pooling to N×N."""
    return F.adaptive_avg_pool2d(mask_probs, grid).flatten(1)


def balanced_bce(probs: Tensor, labels: Tensor) -> Tensor:
    """Class-balanced BCE on labelled points (from-scratch-profile switch, not in the paper).

    Mean BCE over labelled FG points plus mean BCE over labelled BG points, halved; a class
    with no labelled point contributes 0.

    Args:
        probs: (B, n) M̃. labels: (B, n) int8.

    Returns:
        (B,).
    """
    p = probs.float().clamp(BCE_CLAMP, 1 - BCE_CLAMP)
    fg, bg = (labels == 1).float(), (labels == 0).float()
    fg_term = -(torch.log(p) * fg).sum(1) / fg.sum(1).clamp_min(1)
    bg_term = -(torch.log1p(-p) * bg).sum(1) / bg.sum(1).clamp_min(1)
    return 0.5 * (fg_term + bg_term)


def point_loss(
    mask_probs: Tensor,
    labels: Tensor,
    box_mask: Tensor,
    retrieved_count: Tensor,
    lambda_mil: float = LAMBDA_MIL,
    balanced_bce_weight: float = 0.0,
) -> Tensor:
    """Eq. 8: L_point = dice(M̃ ⊙ K, Ŷ) + 1{|P̂_FG ∪ P̂_BG| = 0}·λ_mil·L_mil.

    The indicator is about the *retrieved* pseudo points P̂ of each sample (not the
    initial extreme/outside points); count them before point dropout
    (``exits.method.retrieval.retrieved_count`` on the retrieval output) to follow the paper's
    "none of the points is retrieved".

    Args:
        mask_probs: (B, 1, H, W) probabilities M at generator resolution.
        labels: (B, N²) int8 grid labels (after point dropout).
        box_mask: (B, H, W) or (B, 1, H, W) box area at M's resolution, for the MIL term.
        retrieved_count: (B,) number of retrieved pseudo points per sample.
        lambda_mil: λ_mil.
        balanced_bce_weight: weight of ``balanced_bce`` on the labelled points; 0 = paper.
            (The prototype's point-only dice under 90 % dropout collapsed to all
            background; the BCE term fixed it.)

    Returns:
        scalar, mean over the batch.
    """
    grid = round(labels.shape[1] ** 0.5)
    if grid * grid != labels.shape[1]:
        raise ValueError(f"labels must cover a square grid, got n = {labels.shape[1]}")
    m_tilde = downsample_to_grid(mask_probs, grid)  # (B, n)
    y_hat, k = point_targets(labels)  # (B, n) each
    loss = dice_loss(m_tilde * k, y_hat, reduction="none")  # (B,)
    none_retrieved = (retrieved_count == 0).to(loss.dtype)  # (B,)
    # Always computed (cheap) so the step has no data-dependent host sync.
    mil = projection_mil_loss(mask_probs, box_mask, reduction="none")  # (B,)
    loss = loss + none_retrieved * lambda_mil * mil
    if balanced_bce_weight:
        loss = loss + balanced_bce_weight * balanced_bce(m_tilde, labels)
    return loss.mean()


CRFFn = Callable[[Tensor, Tensor], Tensor]


def crf_loss(
    student_probs: Tensor,
    teacher_probs: Tensor,
    images: Tensor,
    crf_fn: CRFFn,
    box_mask: Tensor | None = None,
    binarize: bool = True,
) -> Tensor:
    """Eq. 9: L_crf = dice(M, CRF(M_avg)), M_avg = (M_student + M_teacher) / 2.

    The CRF output is a fixed target (no gradient). ``binarize`` thresholds it at 0.5 as
    MAL does ("pseudo ground-truth mask"); ``box_mask`` zeroes M_avg outside the box before
    the CRF (MAL); None = the paper's formula as written.

    Args:
        student_probs: (B, 1, h, w) M (gradient flows here).
        teacher_probs: (B, 1, h, w) EMA teacher probabilities.
        images: (B, 3, H, W) RGB, uint8 or float in [0, 1] (not normalised); resized to
            (h, w) when they differ.
        crf_fn: (images (B, 3, h, w), probs (B, 1, h, w)) → refined probs, e.g. a
            ``exits.method.crf`` CRF.
        box_mask: optional (B, 1, h, w) box area.
    """
    with torch.no_grad():
        m_avg = 0.5 * (student_probs.detach() + teacher_probs.detach())  # (B, 1, h, w)
        if box_mask is not None:
            m_avg = m_avg * box_mask.reshape(m_avg.shape).to(m_avg.dtype)
        refined = crf_fn(resize_images(images, m_avg.shape[-2:]), m_avg)
        if binarize:
            refined = (refined > CRF_TARGET_THRESHOLD).to(m_avg.dtype)
    return dice_loss(student_probs, refined.detach())


def resize_images(images: Tensor, size) -> Tensor:
    """(B, 3, H, W) uint8/float RGB → same dtype at ``size`` (area-averaged)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images.float(), size=tuple(size), mode="area")
    if images.dtype == torch.uint8:
        return resized.round().clamp(0, 255).to(torch.uint8)
    return resized


def total_loss(
    l_point: Tensor,
    l_crf: Tensor,
    lambda_point: float = LAMBDA_POINT,
    lambda_crf: float = LAMBDA_CRF,
) -> Tensor:
    """Eq. 10: L_overall = λ_point·L_point + λ_crf·L_crf."""
    return lambda_point * l_point + lambda_crf * l_crf


def box_only_loss(
    l_mil: Tensor,
    l_crf: Tensor,
    lambda_mil: float = LAMBDA_MIL,
    lambda_crf: float = LAMBDA_CRF,
) -> Tensor:
    """MAL's box-only objective (ablation switch): λ_mil·L_mil + λ_crf·L_crf."""
    return lambda_mil * l_mil + lambda_crf * l_crf
