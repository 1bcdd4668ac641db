"""Point retrieval (paper Sec. 3.2.1-3.2.2): transition matrix, random-walk propagation,
pseudo point labels and point dropout, as ONE chain used by training, diagnostics and the bench.

The chain: ``grid_geometry`` (initial points P_FG, P_BG, P_Box) → ``similarity_matrix``
(S, ``exits.method.similarity``) → ``retrieve``: ``transition_matrix`` (Eq. 2) →
``retrieve_from_transition`` (Eq. 3-4 propagation, Eq. 5 thresholds) → ``point_dropout``.

Everything here is batched torch and device-agnostic; no Python loop runs over the batch.

Conventions
-----------
- A crop of S×S pixels is divided into an N×N grid of patches (``grid = N``), flattened
  row-major: patch (row r, column c) has index ``r * N + c``; ``n = N²``.
- Coordinates are in PATCH units: crop pixel / patch size, x right, y down. Patch (c, r)
  covers [c, c + 1) × [r, r + 1); its centre is (c + 0.5, r + 0.5).
- Extreme points are ordered top, left, bottom, right, each (x, y).
- Boxes are [x0, y0, x1, y1] with x1, y1 exclusive (docs/architecture.md: x1 = right.x + 1).
- Point labels are int8: 1 foreground, 0 background, -1 unlabelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exits.config import RetrievalConfig
from exits.method.similarity import (
    EXTRACTOR_SOURCES,
    SIMILARITY_SOURCES,
    compute_similarity,
    patch_centres,
    rgb_to_lab,
)

# Paper defaults (Sec. 4 implementation details) are defined once, in RetrievalConfig;
# the thresholds there are for N² = 1024 tokens.
PAPER_HOPS = RetrievalConfig.hops
PAPER_TAU_FG = RetrievalConfig.tau_fg
PAPER_TAU_BG = RetrievalConfig.tau_bg
PAPER_TOKENS = 1024
PAPER_DROPOUT_RATE = RetrievalConfig.dropout
SINKHORN_ITERS = RetrievalConfig.sinkhorn_iters
SINKHORN_EPS = 1e-12

FG, BG, UNLABELLED = 1, 0, -1


# --------------------------------------------------------------------------------------
# Transition matrix (Eq. 2)
# --------------------------------------------------------------------------------------
def sinkhorn(S: Tensor, n_iters: int = SINKHORN_ITERS) -> Tensor:
    """Sinkhorn–Knopp normalisation to a doubly stochastic matrix.

    Args:
        S: (B, n, n) non-negative similarities with total support (e.g. a positive
            diagonal). Computed in S's dtype.
        n_iters: number of (row, column) normalisation rounds.

    Returns:
        (B, n, n) matrix whose rows and columns each sum to 1 (columns exactly after the
        last round, rows to within the convergence of ``n_iters`` rounds).
    """
    if S.dim() != 3 or S.shape[-1] != S.shape[-2]:
        raise ValueError(f"sinkhorn expects (B, n, n), got {tuple(S.shape)}")
    # Every round's matrix is diag(r) S diag(c): iterate the scaling vectors with two batched
    # matrix-vector products per round instead of rewriting the n x n matrix four times
    # (same numbers, ~5x less memory traffic at n = 1024; the test checks it against the
    # alternating normalisation as written)
    K = S.clamp_min(0)
    r = K.new_ones(K.shape[:-1])  # (B, n) row scales
    c = K.new_ones(K.shape[:-1])  # (B, n) column scales
    for _ in range(n_iters):
        kc = torch.bmm(K, c[..., None])[..., 0]  # (B, n): row sums are r * kc
        # an all-zero row stays zero whatever its scale: keep the scale finite (no 0 * inf)
        r = torch.where(kc > 0, r / (r * kc + SINKHORN_EPS), r)
        kr = torch.bmm(r[:, None], K)[:, 0]  # (B, n): column sums are c * kr
        c = torch.where(kr > 0, c / (c * kr + SINKHORN_EPS), c)
    return r[..., None] * K * c[:, None]


def transition_matrix(attn: Tensor, n_iters: int = SINKHORN_ITERS) -> Tensor:
    """Eq. 2: T = (A + Aᵀ) / 2 with A = Sinkhorn(S).

    Args:
        attn: (B, n, n) similarity S (head-averaged attention over patch tokens).

    Returns:
        (B, n, n) symmetric, (approximately) doubly stochastic transition matrix.
    """
    A = sinkhorn(attn, n_iters)  # (B, n, n)
    return 0.5 * (A + A.transpose(-1, -2))


# --------------------------------------------------------------------------------------
# Propagation (Eq. 3-5)
# --------------------------------------------------------------------------------------
def _mean_distribution(points: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, n) bool set → (B, n) uniform distribution over it; all zeros when empty."""
    p = points.to(dtype)
    count = p.sum(dim=-1, keepdim=True)  # (B, 1)
    return p / count.clamp_min(1)


def propagation_scores(
    T: Tensor, fg: Tensor, bg: Tensor, hops: int = PAPER_HOPS
) -> tuple[Tensor, Tensor]:
    """Eq. 3-4: α-hop random-walk propagation scores from the initial FG and BG sets.

    π_f(i) = 1/|P_FG| · Σ_{j ∈ P_FG} T^α(j, i), computed as ``hops`` batched
    vector–matrix products (v ← v T), never forming T^α.

    Args:
        T: (B, n, n) transition matrix (row j = from point j).
        fg: (B, n) bool, initial foreground points P_FG.
        bg: (B, n) bool, initial background points P_BG.
        hops: α, the number of random-walk steps.

    Returns:
        (pi_f, pi_b), each (B, n) in T's dtype. An empty set gives scores 0 (no NaN).
    """
    v = torch.stack([_mean_distribution(fg, T.dtype), _mean_distribution(bg, T.dtype)], 1)
    # v: (B, 2, n) start distributions
    for _ in range(hops):
        v = torch.bmm(v, T)  # (B, 2, n)
    return v[:, 0], v[:, 1]


def label_points(
    diff: Tensor,
    fg: Tensor,
    bg: Tensor,
    in_box: Tensor,
    tau_fg: float | Tensor,
    tau_bg: float | Tensor,
) -> Tensor:
    """Eq. 5 on precomputed scores: threshold π_f − π_b inside the box.

    Args:
        diff: (B, n) π_f − π_b.
        fg, bg, in_box: (B, n) bool masks (initial FG, initial BG, P_Box).
        tau_fg, tau_bg: thresholds, floats or (B,) tensors (per-sample rules).

    Returns:
        (B, n) int8 labels: 1 pseudo-FG, 0 pseudo-BG, -1 unlabelled. A point that passes
        both tests (possible only with a relative rule on tied scores) stays unlabelled.
        The initial points keep their labels: P_BG → 0, then P_FG → 1.
    """
    tau_fg = torch.as_tensor(tau_fg, dtype=diff.dtype, device=diff.device)
    tau_bg = torch.as_tensor(tau_bg, dtype=diff.dtype, device=diff.device)
    if tau_fg.dim() == 1:
        tau_fg, tau_bg = tau_fg[:, None], tau_bg[:, None]  # (B, 1)
    is_fg = in_box & (diff >= tau_fg)
    is_bg = in_box & (diff <= tau_bg)
    labels = torch.full(diff.shape, UNLABELLED, dtype=torch.int8, device=diff.device)
    labels[is_fg & ~is_bg] = FG
    labels[is_bg & ~is_fg] = BG
    labels[bg] = BG
    labels[fg] = FG
    return labels


def scale_thresholds(tau_fg: float, tau_bg: float, n: int) -> tuple[float, float]:
    """Scale the paper's thresholds (given for n = 1024 tokens) to n tokens.

    Propagation scores are probabilities over n points, so they scale like 1/n.
    """
    factor = PAPER_TOKENS / n
    return tau_fg * factor, tau_bg * factor


def relative_thresholds(
    diff: Tensor,
    in_box: Tensor,
    fg_quantile: float = RetrievalConfig.fg_quantile,
    bg_quantile: float = RetrievalConfig.bg_quantile,
) -> tuple[Tensor, Tensor]:
    """Per-sample thresholds at quantiles of the in-box scores (from-scratch profile).

    With the defaults, the top 20 % of in-box points by π_f − π_b become FG and the
    bottom 20 % BG. Feed the result to ``label_points``.

    Args:
        diff: (B, n) π_f − π_b.
        in_box: (B, n) bool P_Box.

    Returns:
        (tau_fg, tau_bg), each (B,). NaN for a sample with no in-box point (every
        comparison with NaN is false, so nothing is labelled there).
    """
    masked = diff.masked_fill(~in_box, float("nan"))  # (B, n)
    q = torch.tensor([fg_quantile, bg_quantile], dtype=diff.dtype, device=diff.device)
    taus = torch.nanquantile(masked, q, dim=1)  # (2, B)
    return taus[0], taus[1]


# --------------------------------------------------------------------------------------
# Initial points (Sec. 3.2: P_FG, P_BG, P_Box)
# --------------------------------------------------------------------------------------
def initial_points(
    extreme_points_in_crop: Tensor,
    box_in_crop: Tensor,
    grid: int,
    delta: float,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Initial FG/BG points and the box's points on the patch grid.

    P_FG: each extreme point moved ``delta`` toward the box centre along its own axis
    (top: y + δ, left: x + δ, bottom: y − δ, right: x − δ; the paper writes the signs for
    y up), never past the centre, then mapped to the patch containing it (clamped to the
    grid). P_Box: patches whose centre lies in the box (closed interval), plus the P_FG
    patches. P_BG: patches entirely outside the box that are ``valid`` (inside the image;
    crop padding is not background evidence).

    Args:
        extreme_points_in_crop: (B, 4, 2) top, left, bottom, right, each (x, y), in patch
            units (crop pixel / patch size).
        box_in_crop: (B, 4) [x0, y0, x1, y1] in patch units.
        grid: N, patches per side.
        delta: δ in patch units.
        valid: (B, n) bool, patches inside the image; None = all valid.

    Returns:
        (fg, bg, in_box), each (B, n) bool.
    """
    B = extreme_points_in_crop.shape[0]
    n = grid * grid
    dtype = torch.promote_types(extreme_points_in_crop.dtype, torch.float32)
    pts = extreme_points_in_crop.to(dtype)  # (B, 4, 2)
    box = box_in_crop.to(dtype)  # (B, 4)
    device = pts.device

    centre = torch.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2], -1)
    # Move toward the centre along each point's own axis: top/bottom in y, left/right in x.
    axis = torch.tensor([1, 0, 1, 0], device=device)  # (4,) 0 = x, 1 = y
    moving = F.one_hot(axis, 2).to(dtype)  # (4, 2)
    step = (centre[:, None, :] - pts).clamp(-delta, delta) * moving  # (B, 4, 2)
    moved = pts + step  # (B, 4, 2)
    col = moved[..., 0].floor().long().clamp(0, grid - 1)  # (B, 4)
    row = moved[..., 1].floor().long().clamp(0, grid - 1)
    fg = torch.zeros(B, n, dtype=torch.bool, device=device)
    fg.scatter_(1, row * grid + col, True)

    cx, cy = patch_centres(grid, device, dtype)  # (n,)
    x0, y0, x1, y1 = (box[:, i : i + 1] for i in range(4))  # each (B, 1)
    in_box = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)  # (B, n)
    in_box = in_box | fg

    half = 0.5
    outside = (cx + half <= x0) | (cx - half >= x1) | (cy + half <= y0) | (cy - half >= y1)
    bg = outside & ~fg
    if valid is not None:
        bg = bg & valid.to(device=device, dtype=torch.bool)
    return fg, bg, in_box


# --------------------------------------------------------------------------------------
# Point dropout
# --------------------------------------------------------------------------------------
def point_dropout(
    labels: Tensor,
    rate: float = PAPER_DROPOUT_RATE,
    generator: torch.Generator | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """Drop each labelled point independently with probability ``rate`` (→ -1).

    The paper drops from the retrieved sets P̂_FG and P̂_BG only; the initial points are
    kept. Pass ``keep = fg | bg`` (from ``initial_points``) to follow it; with ``keep``
    None every labelled point may be dropped. Resample every step/epoch.

    Args:
        labels: (B, n) int8 from ``retrieve``.
        rate: drop probability in [0, 1].
        generator: torch.Generator on ``labels.device`` for reproducibility.
        keep: (B, n) bool, points never dropped.

    Returns:
        (B, n) int8, a new tensor.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    u = torch.rand(labels.shape, generator=generator, device=labels.device)  # (B, n)
    drop = (u < rate) & (labels != UNLABELLED)
    if keep is not None:
        drop = drop & ~keep
    return labels.masked_fill(drop, UNLABELLED)


def retrieved_count(labels: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
    """(B,) number of retrieved pseudo points |P̂_FG ∪ P̂_BG| (labelled, not initial)."""
    return ((labels != UNLABELLED) & ~fg & ~bg).sum(dim=1)


# --------------------------------------------------------------------------------------
# The chain (Eq. 2-5) on batches of crops: used by training, diagnostics, report and bench
# --------------------------------------------------------------------------------------
@dataclass
class GridGeometry:
    """Per-batch geometry on the patch grid (``initial_points`` of a batch of crops)."""

    fg: Tensor  # (B, n) bool initial FG points P_FG
    bg: Tensor  # (B, n) bool initial BG points P_BG
    in_box: Tensor  # (B, n) bool P_Box
    grid: int


def grid_geometry(batch: dict, grid: int, delta: float) -> GridGeometry:
    """Initial points on the N x N grid from crop-pixel geometry (``initial_points``).

    Args:
        batch: tensors of a batch of B crops of S x S (``exits.train.data.CropDataset``
            items): "image" (B, 3, S, S), "points" (B, 4, 2) extreme points in crop pixels,
            "box" (B, 4) in crop pixel edges, "valid" (B, S, S) inside the image,
            "has_points" (B,) bool (False for box-only rows).
        grid: N.
        delta: δ in patch units.
    """
    S = batch["image"].shape[-1]
    patch = S / grid
    pts = (batch["points"] + 0.5) / patch  # pixel centres -> patch units, (B, 4, 2)
    box = batch["box"] / patch  # edges -> patch units, (B, 4)
    valid = F.adaptive_avg_pool2d(batch["valid"].float()[:, None], grid)[:, 0] > 0.5  # (B, N, N)
    fg, bg, in_box = initial_points(pts, box, grid, delta, valid.flatten(1))
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
    return compute_similarity(
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


def scores_from_transition(T: Tensor, geo: GridGeometry, hops: int = PAPER_HOPS) -> Tensor:
    """Eq. 3-4: (B, n) π_f − π_b from the transition matrix T (B, n, n)."""
    pi_f, pi_b = propagation_scores(T, geo.fg, geo.bg, hops)
    return pi_f - pi_b


@torch.no_grad()
def retrieval_scores(sim: Tensor, geo: GridGeometry, rcfg: RetrievalConfig) -> Tensor:
    """Eq. 2-4: (B, n) π_f − π_b from the similarity S (B, n, n)."""
    T = transition_matrix(sim.float(), rcfg.sinkhorn_iters)
    return scores_from_transition(T, geo, rcfg.hops)


@torch.no_grad()
def labels_from_scores(diff: Tensor, geo: GridGeometry, rcfg: RetrievalConfig) -> Tensor:
    """Eq. 5 with the configured threshold rule: (B, n) int8 pseudo point labels.

    "absolute": the paper's thresholds scaled from 1024 tokens to n (``scale_thresholds``);
    "relative": per-crop quantiles of the in-box, non-initial scores (``relative_thresholds``).
    """
    if rcfg.threshold_rule == "relative":
        tau_fg, tau_bg = relative_thresholds(
            diff, geo.in_box & ~geo.fg, rcfg.fg_quantile, rcfg.bg_quantile
        )
    elif rcfg.threshold_rule == "absolute":
        tau_fg, tau_bg = scale_thresholds(rcfg.tau_fg, rcfg.tau_bg, geo.grid * geo.grid)
    else:
        raise ValueError(f"unknown threshold_rule {rcfg.threshold_rule!r}")
    return label_points(diff, geo.fg, geo.bg, geo.in_box, tau_fg, tau_bg)


@torch.no_grad()
def retrieve_from_transition(T: Tensor, geo: GridGeometry, rcfg: RetrievalConfig) -> Tensor:
    """Eq. 3-5: (B, n) int8 pseudo point labels from the transition matrix T (B, n, n).

    1 pseudo-FG (P_FG ∪ P̂_FG), 0 pseudo-BG (P_BG ∪ P̂_BG), -1 unlabelled; only points
    inside the box receive pseudo labels.
    """
    return labels_from_scores(scores_from_transition(T, geo, rcfg.hops), geo, rcfg)


@torch.no_grad()
def retrieve(sim: Tensor, geo: GridGeometry, rcfg: RetrievalConfig) -> Tensor:
    """Eq. 2-5: (B, n) int8 pseudo point labels (before dropout) from the similarity S.

    With ``rcfg.enabled`` False only the initial points are labelled (no retrieval; ``sim``
    is not read).
    """
    if not rcfg.enabled:
        inf = float("inf")
        return label_points(
            torch.zeros(geo.fg.shape, device=sim.device), geo.fg, geo.bg, geo.in_box, inf, -inf
        )
    T = transition_matrix(sim.float(), rcfg.sinkhorn_iters)  # (B, n, n)
    return retrieve_from_transition(T, geo, rcfg)


__all__ = [
    "BG",
    "EXTRACTOR_SOURCES",
    "FG",
    "SIMILARITY_SOURCES",
    "UNLABELLED",
    "GridGeometry",
    "compute_similarity",
    "grid_geometry",
    "initial_points",
    "label_points",
    "labels_from_scores",
    "point_dropout",
    "propagation_scores",
    "relative_thresholds",
    "retrieval_scores",
    "retrieve",
    "retrieve_from_transition",
    "retrieved_count",
    "rgb_to_lab",
    "scale_thresholds",
    "scores_from_transition",
    "similarity_matrix",
    "sinkhorn",
    "transition_matrix",
]
