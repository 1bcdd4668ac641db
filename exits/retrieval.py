"""Point retrieval (paper Sec. 3.2.1-3.2.2): transition matrix, random-walk propagation,
pseudo point labels and point dropout.

Everything here is batched torch and device-agnostic; no Python loop runs over the batch.

Conventions
-----------
- A crop of S×S pixels is divided into an N×N grid of patches (``grid = N``), flattened
  row-major: patch (row r, column c) has index ``r * N + c``; ``n = N²``.
- Coordinates are in PATCH units: crop pixel / patch size, x right, y down. Patch (c, r)
  covers [c, c + 1) × [r, r + 1); its centre is (c + 0.5, r + 0.5).
- Extreme points are ordered top, left, bottom, right, each (x, y).
- Boxes are [x0, y0, x1, y1] with x1, y1 exclusive (DESIGN.md: x1 = right.x + 1).
- Point labels are int8: 1 foreground, 0 background, -1 unlabelled.

The similarity source is pluggable (``SIMILARITY_SOURCES``): the paper's extractor attention
or the training-free kernels used by the from-scratch profile (DESIGN.md, prototype).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Paper defaults (Sec. 4 implementation details); thresholds are for N² = 1024 tokens.
PAPER_HOPS = 3
PAPER_TAU_FG = 1e-3
PAPER_TAU_BG = -1e-4
PAPER_TOKENS = 1024
PAPER_DROPOUT_RATE = 0.9
SINKHORN_ITERS = 50
SINKHORN_EPS = 1e-12

FG, BG, UNLABELLED = 1, 0, -1

# Extreme-point order and the unit step that moves each point toward the box centre
# (x right, y down): top moves down, left moves right, bottom moves up, right moves left.
EXTREME_ORDER = ("top", "left", "bottom", "right")

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

# Training-free kernel defaults (DESIGN.md prototype: θα = 1.5 cells, θβ = 10 Lab units).
THETA_POS = 1.5
THETA_COL = 10.0
TOKEN_TEMPERATURE = 0.05  # pretrained-token kernel (DESIGN.md, third prototype)


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
    A = S.clamp_min(0)
    for _ in range(n_iters):
        A = A / (A.sum(dim=-1, keepdim=True) + SINKHORN_EPS)  # rows
        A = A / (A.sum(dim=-2, keepdim=True) + SINKHORN_EPS)  # columns
    return A


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


def retrieve_points(
    T: Tensor,
    fg: Tensor,
    bg: Tensor,
    in_box: Tensor,
    hops: int = PAPER_HOPS,
    tau_fg: float | Tensor = PAPER_TAU_FG,
    tau_bg: float | Tensor = PAPER_TAU_BG,
) -> Tensor:
    """Eq. 3-5: pseudo point labels for the points of the box.

    Args:
        T: (B, n, n) transition matrix (Eq. 2).
        fg, bg, in_box: (B, n) bool (P_FG, P_BG, P_Box) from ``initial_points``.
        hops: α.
        tau_fg, tau_bg: thresholds on π_f − π_b (floats or (B,) tensors). The paper's
            values are for n = 1024; use ``scale_thresholds`` for other grids.

    Returns:
        (B, n) int8: 1 pseudo-FG (P_FG ∪ P̂_FG), 0 pseudo-BG (P_BG ∪ P̂_BG), -1 unlabelled.
        Only points inside the box receive pseudo labels.
    """
    pi_f, pi_b = propagation_scores(T, fg, bg, hops)
    return label_points(pi_f - pi_b, fg, bg, in_box, tau_fg, tau_bg)


def scale_thresholds(tau_fg: float, tau_bg: float, n: int) -> tuple[float, float]:
    """Scale the paper's thresholds (given for n = 1024 tokens) to n tokens.

    Propagation scores are probabilities over n points, so they scale like 1/n.
    """
    factor = PAPER_TOKENS / n
    return tau_fg * factor, tau_bg * factor


def relative_thresholds(
    diff: Tensor, in_box: Tensor, fg_quantile: float = 0.8, bg_quantile: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Per-sample thresholds at quantiles of the in-box scores (from-scratch profile).

    With the defaults, the top 20 % of in-box points by π_f − π_b become FG and the
    bottom 20 % BG. Feed the result to ``label_points`` (or ``retrieve_points``).

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
def _patch_centres(grid: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(n,) x and y of patch centres in patch units, row-major."""
    c = torch.arange(grid, device=device, dtype=dtype) + 0.5
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    return cx.reshape(-1), cy.reshape(-1)


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

    cx, cy = _patch_centres(grid, device, dtype)  # (n,)
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
        labels: (B, n) int8 from ``retrieve_points``.
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
# Similarity sources
# --------------------------------------------------------------------------------------
def _to_unit_rgb(crops: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] RGB → float32 in [0, 1]."""
    if crops.dtype == torch.uint8:
        return crops.float() / UINT8_MAX
    return crops.float()


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB (B, 3, H, W) float in [0, 1] → CIELAB (B, 3, H, W) (D65; L in [0, 100])."""
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
    cx, cy = _patch_centres(grid, device or torch.device("cpu"), torch.float32)
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
