"""One optimisation step of each stage-1 objective, as plain torch (no Ray): testable alone.

Shapes: B crops of S x S; the generator predicts at h = S / 4; the similarity grid is N x N
patches (n = N^2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exits import retrieval
from exits.config import LossConfig, RetrievalConfig
from exits.data.transforms import normalize, student_augment
from exits.losses import (
    balanced_bce,
    box_only_loss,
    crf_loss,
    point_loss,
    projection_mil_loss,
    total_loss,
)

PAIRWISE_COLOR_TAU = 0.3  # BoxInst: neighbours with colour similarity >= tau are "same label"
PAIRWISE_THETA = 2.0  # BoxInst: similarity exp(-||dLab|| / theta)
PAIRWISE_DILATION = 2


def pairwise_color_loss(logits: Tensor, images: Tensor, box_mask: Tensor) -> Tensor:
    """BoxInst's pairwise term (from-scratch warm-up switch, not a paper equation).

    For each pixel and its 8 neighbours at ``PAIRWISE_DILATION`` inside the box whose CIELAB
    colour similarity exp(-||dLab|| / theta) >= tau, maximise P(same label) =
    p_i p_j + (1 - p_i)(1 - p_j), computed stably in log space.

    Args:
        logits: (B, 1, h, h) mask logits; images: (B, 3, S, S) float RGB in [0, 1];
        box_mask: (B, 1, h, h) float.
    """
    h = logits.shape[-1]
    lab = retrieval.rgb_to_lab(F.interpolate(images, size=(h, h), mode="area"))  # (B, 3, h, h)
    log_fg = F.logsigmoid(logits)  # (B, 1, h, h)
    log_bg = F.logsigmoid(-logits)
    d = PAIRWISE_DILATION
    total, count = logits.new_zeros(()), logits.new_zeros(())
    for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):
        shift = functools.partial(torch.roll, shifts=(dy, dx), dims=(2, 3))
        sim = torch.exp(-(lab - shift(lab)).norm(dim=1, keepdim=True) / PAIRWISE_THETA)
        valid = (sim >= PAIRWISE_COLOR_TAU).float() * box_mask * shift(box_mask)
        same = torch.logaddexp(log_fg + shift(log_fg), log_bg + shift(log_bg))  # log P(same)
        total = total - (same * valid).sum()
        count = count + valid.sum()
    return total / count.clamp_min(1.0)


@dataclass
class GridGeometry:
    """Per-batch geometry on the patch grid (from ``CropDataset`` items)."""

    fg: Tensor  # (B, n) bool initial FG points P_FG
    bg: Tensor  # (B, n) bool initial BG points P_BG
    in_box: Tensor  # (B, n) bool P_Box
    grid: int


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def box_mask_at(batch: dict, size: int) -> Tensor:
    """(B, 1, size, size) float box area at the prediction resolution."""
    m = batch["box_mask"].float()[:, None]
    return (F.adaptive_avg_pool2d(m, size) > 0.5).float()


def grid_geometry(batch: dict, grid: int, delta: float) -> GridGeometry:
    """Initial points on the N x N grid from crop-pixel geometry (retrieval.initial_points)."""
    S = batch["image"].shape[-1]
    patch = S / grid
    pts = (batch["points"] + 0.5) / patch  # pixel centres -> patch units, (B, 4, 2)
    box = batch["box"] / patch  # edges -> patch units, (B, 4)
    valid = F.adaptive_avg_pool2d(batch["valid"].float()[:, None], grid)[:, 0] > 0.5  # (B, N, N)
    fg, bg, in_box = retrieval.initial_points(pts, box, grid, delta, valid.flatten(1))
    fg = fg & batch["has_points"][:, None]  # box-only rows have no extreme points
    return GridGeometry(fg=fg, bg=bg, in_box=in_box, grid=grid)


def similarity_matrix(
    source: str,
    images_u8: Tensor,
    normalised: Tensor,
    grid: int,
    extractor: nn.Module | None,
    rcfg: RetrievalConfig,
    precomputed: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """S (B, n, n) from the configured source (extractor attention, bilateral, ...).

    ``precomputed``: (tokens, attention) of the extractor's encoder for these images, when a
    pass that shares its weights already produced them (``shares_frozen_encoder``).
    """
    attention_fn = extractor.similarity if extractor is not None else None
    tokens_fn = extractor.tokens if extractor is not None else None
    if precomputed is not None:
        tokens, attention = precomputed
        attention_fn, tokens_fn = (lambda _: attention), (lambda _: tokens)
    return retrieval.compute_similarity(
        source,
        rgb=images_u8,
        grid=grid,
        normalised=normalised,
        attention_fn=attention_fn,
        theta_pos=rcfg.bilateral_theta_pos,
        theta_col=rcfg.bilateral_theta_col,
        tokens_fn=tokens_fn,
        token_temperature=rcfg.token_temperature,
    )


@torch.no_grad()
def retrieval_scores(sim: Tensor, geo: GridGeometry, rcfg: RetrievalConfig) -> Tensor:
    """Eq. 2-4: (B, n) π_f − π_b from the similarity S."""
    T = retrieval.transition_matrix(sim.float(), rcfg.sinkhorn_iters)
    pi_f, pi_b = retrieval.propagation_scores(T, geo.fg, geo.bg, rcfg.hops)
    return pi_f - pi_b


@torch.no_grad()
def labels_from_scores(diff: Tensor, geo: GridGeometry, rcfg: RetrievalConfig) -> Tensor:
    """Eq. 5 with the configured threshold rule: (B, n) int8 pseudo point labels."""
    if rcfg.threshold_rule == "relative":
        tau_fg, tau_bg = retrieval.relative_thresholds(
            diff, geo.in_box & ~geo.fg, rcfg.fg_quantile, rcfg.bg_quantile
        )
    elif rcfg.threshold_rule == "absolute":
        tau_fg, tau_bg = retrieval.scale_thresholds(rcfg.tau_fg, rcfg.tau_bg, geo.grid * geo.grid)
    else:
        raise ValueError(f"unknown threshold_rule {rcfg.threshold_rule!r}")
    return retrieval.label_points(diff, geo.fg, geo.bg, geo.in_box, tau_fg, tau_bg)


@torch.no_grad()
def retrieve(sim: Tensor, geo: GridGeometry, rcfg: RetrievalConfig) -> Tensor:
    """Eq. 2-5: (B, n) int8 pseudo point labels (before dropout).

    With ``rcfg.enabled`` False only the initial points are labelled (no retrieval).
    """
    if not rcfg.enabled:
        inf = float("inf")
        return retrieval.label_points(
            torch.zeros(geo.fg.shape, device=sim.device), geo.fg, geo.bg, geo.in_box, inf, -inf
        )
    return labels_from_scores(retrieval_scores(sim, geo, rcfg), geo, rcfg)


def warmup_loss(extractor: nn.Module, batch: dict, lcfg: LossConfig) -> tuple[Tensor, dict]:
    """Stage 1a: MIL projection loss (Eq. 1) [+ optional pairwise colour term]."""
    images = batch["image"].float() / 255.0
    logits = extractor(normalize(images))  # (B, 1, h, h)
    probs = logits.sigmoid()
    box = box_mask_at(batch, probs.shape[-1])
    l_mil = projection_mil_loss(probs, box)
    loss = l_mil
    logs = {"loss_mil": float(l_mil.detach())}
    if lcfg.warmup_pairwise > 0:
        l_pair = pairwise_color_loss(logits, images, box)
        loss = loss + lcfg.warmup_pairwise * l_pair
        logs["loss_pairwise"] = float(l_pair.detach())
    logs["loss"] = float(loss.detach())
    return loss, logs


def generator_loss(
    student: nn.Module,
    teacher: nn.Module,
    extractor: nn.Module | None,
    batch: dict,
    rcfg: RetrievalConfig,
    lcfg: LossConfig,
    crf_fn,
    generator: torch.Generator | None = None,
    shared_extractor: bool = False,
) -> tuple[Tensor, dict]:
    """Stage 1b: EXITS objective (Eq. 10) or the box-only ablation, for one batch.

    ``shared_extractor``: the teacher's frozen encoder equals the extractor's
    (``shares_frozen_encoder``), so one teacher pass yields the extractor's tokens and
    attention too (same numbers, one encoder pass fewer).
    """
    images = batch["image"].float() / 255.0  # (B, 3, S, S)
    student_in = normalize(student_augment(images, generator))
    logits = student(student_in)  # (B, 1, h, h)
    probs = logits.sigmoid()
    share = (
        shared_extractor
        and extractor is not None
        and lcfg.objective == "exits"
        and rcfg.enabled
        and rcfg.similarity in retrieval.EXTRACTOR_SOURCES
    )
    precomputed = None
    with torch.no_grad():
        if share:
            t_logits, tokens, attention = teacher.forward_with_similarity(
                normalize(images), extractor.attention_block
            )
            precomputed = (tokens, attention)
        else:
            t_logits = teacher(normalize(images))
        teacher_probs = t_logits.sigmoid()
    h = probs.shape[-1]
    box = box_mask_at(batch, h)
    l_crf = crf_loss(probs, teacher_probs, batch["image"], crf_fn, box_mask=box)
    logs: dict = {"loss_crf": float(l_crf.detach())}
    if lcfg.objective == "box_only":
        l_mil = projection_mil_loss(probs, box)
        loss = box_only_loss(l_mil, l_crf, lcfg.lambda_mil, lcfg.lambda_crf)
        logs.update(loss_mil=float(l_mil.detach()), loss=float(loss.detach()))
        return loss, logs
    if lcfg.objective != "exits":
        raise ValueError(f"unknown objective {lcfg.objective!r}")
    grid = (
        extractor.grid if extractor is not None else getattr(student, "module", student).grid
    )  # DDP-wrapped
    geo = grid_geometry(batch, grid, rcfg.delta)
    if rcfg.enabled:
        sim = similarity_matrix(
            rcfg.similarity, batch["image"], normalize(images), grid, extractor, rcfg, precomputed
        )
    else:  # initial points only: no similarity needed
        sim = images.new_zeros(())
    labels = retrieve(sim, geo, rcfg)
    n_retrieved = retrieval.retrieved_count(labels, geo.fg, geo.bg)  # (B,) before dropout
    dropped = retrieval.point_dropout(labels, rcfg.dropout, generator=None, keep=geo.fg | geo.bg)
    l_point = point_loss(probs, dropped, box, n_retrieved, lcfg.lambda_mil, lcfg.balanced_bce)
    loss = total_loss(l_point, l_crf, lcfg.lambda_point, lcfg.lambda_crf)
    pseudo = ~(geo.fg | geo.bg)
    logs.update(
        loss_point=float(l_point.detach()),
        loss=float(loss.detach()),
        retrieved_fg=float(((labels == 1) & pseudo).sum(1).float().mean()),
        retrieved_bg=float(((labels == 0) & pseudo).sum(1).float().mean()),
        no_retrieval_frac=float((n_retrieved == 0).float().mean()),
    )
    return loss, logs


__all__ = [
    "GridGeometry",
    "balanced_bce",
    "box_mask_at",
    "generator_loss",
    "grid_geometry",
    "retrieve",
    "similarity_matrix",
    "to_device",
    "warmup_loss",
]
