"""One optimisation step of each stage-1 objective, as plain torch (no Ray): testable alone.

Shapes: B crops of S x S; the generator predicts at h = S / 4; the similarity grid is N x N
patches (n = N^2).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exits.config import LossConfig, RetrievalConfig
from exits.data.transforms import normalize, student_augment
from exits.method import retrieval
from exits.method.losses import (
    box_only_loss,
    crf_loss,
    point_loss,
    projection_mil_loss,
    total_loss,
)
from exits.method.retrieval import grid_geometry, retrieve, similarity_matrix

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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def box_mask_at(batch: dict, size: int) -> Tensor:
    """(B, 1, size, size) float box area at the prediction resolution."""
    m = batch["box_mask"].float()[:, None]
    return (F.adaptive_avg_pool2d(m, size) > 0.5).float()


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
    clean = normalize(images)  # teacher and similarity input
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
                clean, extractor.attention_block
            )
            precomputed = (tokens, attention)
        else:
            t_logits = teacher(clean)
        teacher_probs = t_logits.sigmoid()
    h = probs.shape[-1]
    box = box_mask_at(batch, h)
    if lcfg.objective == "exits":
        grid = (
            extractor.grid if extractor is not None else getattr(student, "module", student).grid
        )  # DDP-wrapped
        geo = grid_geometry(batch, grid, rcfg.delta)
        labels = point_labels(batch, clean, grid, extractor, rcfg, geo, precomputed)
        points = (labels, geo.fg | geo.bg)
    else:
        points = None
    return objective(probs, teacher_probs, box, batch["image"], points, rcfg, lcfg, crf_fn)


def point_labels(
    batch: dict,
    clean: Tensor,
    grid: int,
    extractor: nn.Module | None,
    rcfg: RetrievalConfig,
    geo,
    precomputed: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Eq. 2-5: (B, N²) grid labels (initial + retrieved points, before dropout); with
    retrieval disabled (the initial-points ablation) only the initial points."""
    if rcfg.enabled:
        sim = similarity_matrix(
            rcfg.similarity, batch["image"], clean, grid, extractor, rcfg, precomputed
        )
    else:  # initial points only: no similarity needed
        sim = clean.new_zeros(())
    return retrieve(sim, geo, rcfg)


def objective(
    probs: Tensor,
    teacher_probs: Tensor,
    box: Tensor,
    images_u8: Tensor,
    points: tuple[Tensor, Tensor] | None,
    rcfg: RetrievalConfig,
    lcfg: LossConfig,
    crf_fn,
) -> tuple[Tensor, dict]:
    """Eq. 10 (or the box-only ablation) from the student's and teacher's probabilities.

    Args:
        probs, teacher_probs: (B, 1, h, h); box: (B, 1, h, h) float box area;
        images_u8: (B, 3, H, W) crops for the CRF (resized to h inside);
        points: (labels (B, N²) before dropout, keep (B, N²) = the initial FG | BG points);
            None for the box-only objective.
    """
    l_crf = crf_loss(probs, teacher_probs, images_u8, crf_fn, box_mask=box)
    logs: dict = {"loss_crf": float(l_crf.detach())}
    if lcfg.objective == "box_only":
        l_mil = projection_mil_loss(probs, box)
        loss = box_only_loss(l_mil, l_crf, lcfg.lambda_mil, lcfg.lambda_crf)
        logs.update(loss_mil=float(l_mil.detach()), loss=float(loss.detach()))
        return loss, logs
    if lcfg.objective != "exits" or points is None:
        raise ValueError(f"unknown objective {lcfg.objective!r} (or no points for exits)")
    labels, keep = points
    pseudo = ~keep
    n_retrieved = retrieval.retrieved_count(labels, keep, keep)  # (B,) before dropout
    dropped = retrieval.point_dropout(labels, rcfg.dropout, generator=None, keep=keep)
    l_point = point_loss(probs, dropped, box, n_retrieved, lcfg.lambda_mil, lcfg.balanced_bce)
    loss = total_loss(l_point, l_crf, lcfg.lambda_point, lcfg.lambda_crf)
    logs.update(
        loss_point=float(l_point.detach()),
        loss=float(loss.detach()),
        retrieved_fg=float(((labels == 1) & pseudo).sum(1).float().mean()),
        retrieved_bg=float(((labels == 0) & pseudo).sum(1).float().mean()),
        no_retrieval_frac=float((n_retrieved == 0).float().mean()),
    )
    return loss, logs


__all__ = [
    "box_mask_at",
    "generator_loss",
    "objective",
    "point_labels",
    "pairwise_color_loss",
    "to_device",
    "warmup_loss",
]
