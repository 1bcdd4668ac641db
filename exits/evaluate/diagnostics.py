"""Retrieval diagnostics against GT: the first thing to measure before training on retrieval.

For a batch of crops with GT masks, compare the pseudo point labels (Eq. 5) and the score
π_f − π_b with GT patch labels (patch = foreground when >= half its pixels are GT):
FG/BG precision and recall over retrieved (non-initial) in-box points, and the AUC of the
score over in-box patches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from torch import nn

from exits.config import RetrievalConfig
from exits.data.transforms import normalize
from exits.method.retrieval import (
    grid_geometry,
    labels_from_scores,
    retrieval_scores,
    retrieve,
    similarity_matrix,
)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U of the positives over pos·neg (ties count one half); NaN
    when one class is absent."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    u = mannwhitneyu(pos, neg, method="asymptotic").statistic  # the p-value is not used
    return float(u / (len(pos) * len(neg)))


@torch.no_grad()
def retrieval_stats(
    batches, grid: int, rcfg: RetrievalConfig, extractor: nn.Module | None = None
) -> dict:
    """Aggregate retrieval precision/recall/AUC over an iterable of ``CropDataset`` batches."""
    tp_f = n_f = tp_b = n_b = gt_f = gt_b = 0
    scores, truth = [], []
    n_crops = 0
    for batch in batches:
        n_crops += batch["image"].shape[0]
        images = batch["image"].float() / 255.0
        geo = grid_geometry(batch, grid, rcfg.delta)
        sim = similarity_matrix(
            rcfg.similarity, batch["image"], normalize(images), grid, extractor, rcfg
        )
        diff = retrieval_scores(sim, geo, rcfg)  # π_f − π_b, shared by labels and AUC
        labels = labels_from_scores(diff, geo, rcfg) if rcfg.enabled else retrieve(sim, geo, rcfg)
        gt = F.adaptive_avg_pool2d(batch["gt"].float()[:, None], grid).flatten(1) >= 0.5  # (B, n)
        pseudo = geo.in_box & ~geo.fg & ~geo.bg
        fg_pred, bg_pred = (labels == 1) & pseudo, (labels == 0) & pseudo
        tp_f += int((fg_pred & gt).sum())
        n_f += int(fg_pred.sum())
        tp_b += int((bg_pred & ~gt).sum())
        n_b += int(bg_pred.sum())
        gt_f += int((pseudo & gt).sum())
        gt_b += int((pseudo & ~gt).sum())
        scores.append(diff[geo.in_box].cpu().numpy())
        truth.append(gt[geo.in_box].cpu().numpy())
    s, t = np.concatenate(scores), np.concatenate(truth)
    return {
        "fg_precision": tp_f / n_f if n_f else float("nan"),
        "fg_recall": tp_f / gt_f if gt_f else float("nan"),
        "bg_precision": tp_b / n_b if n_b else float("nan"),
        "bg_recall": tp_b / gt_b if gt_b else float("nan"),
        "fg_per_crop": n_f / max(1, n_crops),
        "bg_per_crop": n_b / max(1, n_crops),
        "auc": _auc(s, t),
    }


RETRIEVAL_EXAMPLES = 8  # val crops whose retrieval the eval stage saves for the report figure


@torch.no_grad()
def retrieval_examples(
    batch: dict, grid: int, rcfg: RetrievalConfig, extractor: nn.Module | None = None
) -> dict[str, np.ndarray]:
    """Retrieval (Eq. 5) on one batch of B crops, as numpy arrays the report draws from.

    Args:
        batch: collated ``CropDataset`` items (see ``exits.method.retrieval.grid_geometry``).
        grid: N (patch grid side); n = N * N patches.
        rcfg: retrieval config (similarity source, thresholds, hops, δ).
        extractor: the warm-up model for attention-type similarity sources.

    Returns:
        image (B, S, S, 3) uint8 RGB; box (B, 4) float32 crop pixel edges; points (B, 4, 2)
        float32 crop pixels; has_points (B,) bool; gt (B, S, S) bool; fg / bg / in_box (B, n)
        bool initial FG, initial BG, inside the box; labels (B, n) int8 (1 pseudo-FG,
        0 pseudo-BG, -1 unlabelled); n_fg / n_bg (B,) retrieved (non-initial, in-box)
        pseudo-FG / BG patches; prec_fg / prec_bg (B,) their precision vs GT patches (patch =
        FG when >= half its pixels are GT; NaN without GT or without retrieved points).
    """
    geo = grid_geometry(batch, grid, rcfg.delta)
    sim = similarity_matrix(
        rcfg.similarity,
        batch["image"],
        normalize(batch["image"].float() / 255.0),
        grid,
        extractor,
        rcfg,
    )
    labels = retrieve(sim, geo, rcfg).cpu().numpy()
    gt_patch = (
        F.adaptive_avg_pool2d(batch["gt"].float()[:, None], grid).flatten(1).cpu().numpy() >= 0.5
    )  # (B, n)
    fg, bg, in_box = (t.cpu().numpy() for t in (geo.fg, geo.bg, geo.in_box))
    pseudo = in_box & ~fg & ~bg
    rfg, rbg = pseudo & (labels == 1), pseudo & (labels == 0)
    has_gt = batch["gt"].flatten(1).any(1).cpu().numpy()
    n_fg, n_bg = rfg.sum(1), rbg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec_fg = np.where(has_gt & (n_fg > 0), (rfg & gt_patch).sum(1) / n_fg, np.nan)
        prec_bg = np.where(has_gt & (n_bg > 0), (rbg & ~gt_patch).sum(1) / n_bg, np.nan)
    return {
        "image": batch["image"].permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8),
        "box": batch["box"].cpu().numpy().astype(np.float32),
        "points": batch["points"].cpu().numpy().astype(np.float32),
        "has_points": batch["has_points"].cpu().numpy().astype(bool),
        "gt": batch["gt"].cpu().numpy().astype(bool),
        "fg": fg,
        "bg": bg,
        "in_box": in_box,
        "labels": labels.astype(np.int8),
        "n_fg": n_fg.astype(np.int64),
        "n_bg": n_bg.astype(np.int64),
        "prec_fg": prec_fg.astype(np.float64),
        "prec_bg": prec_bg.astype(np.float64),
    }
