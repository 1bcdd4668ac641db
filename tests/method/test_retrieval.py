"""Known-answer tests for exits.method.retrieval and exits.method.similarity (paper Eq. 2-5,
point dropout, initial points, similarity sources)."""

import math

import pytest
import torch

from exits.config import RetrievalConfig
from exits.method.retrieval import (
    SINKHORN_EPS,
    GridGeometry,
    initial_points,
    label_points,
    point_dropout,
    propagation_scores,
    relative_thresholds,
    retrieve_from_transition,
    retrieved_count,
    scale_thresholds,
    sinkhorn,
    transition_matrix,
)
from exits.method.similarity import (
    SIMILARITY_SOURCES,
    bilateral_similarity,
    compute_similarity,
    rgb_to_lab,
    spatial_similarity,
    token_similarity,
)


def test_sinkhorn_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    S = torch.rand(4, 50, 50, generator=g) + 0.01  # random positive
    A = sinkhorn(S, n_iters=50)
    ones = torch.ones(4, 50)
    assert torch.allclose(A.sum(-1), ones, atol=1e-4)
    assert torch.allclose(A.sum(-2), ones, atol=1e-4)


def sinkhorn_reference(S, n_iters):
    """Sinkhorn–Knopp as written: alternating row / column normalisation of the matrix."""
    A = S.clamp_min(0)
    for _ in range(n_iters):
        A = A / (A.sum(dim=-1, keepdim=True) + SINKHORN_EPS)  # rows
        A = A / (A.sum(dim=-2, keepdim=True) + SINKHORN_EPS)  # columns
    return A


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_scaling_vectors_equal_alternating_normalisation(dtype):
    """The scaling-vector iteration gives the matrix the alternating row/column normalisation
    gives, round for round (1, 3 and 50 rounds; a zero row and column kept at zero)."""
    g = torch.Generator().manual_seed(3)
    S = torch.rand(3, 64, 64, generator=g, dtype=torch.float64).softmax(-1).to(dtype)
    S[1, 5], S[1, :, 9] = 0, 0
    for n_iters in (1, 3, 50):
        ref = sinkhorn_reference(S, n_iters)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert torch.allclose(sinkhorn(S, n_iters), ref, rtol=1e-4, atol=tol)


def test_transition_matrix_symmetric_doubly_stochastic():
    g = torch.Generator().manual_seed(1)
    T = transition_matrix(torch.rand(2, 20, 20, generator=g).softmax(-1))
    assert torch.allclose(T, T.transpose(1, 2))
    assert torch.allclose(T.sum(-1), torch.ones(2, 20), atol=1e-4)


def test_propagation_scores_match_dense_matrix_power():
    g = torch.Generator().manual_seed(2)
    B, n, hops = 3, 30, 3
    T = transition_matrix(torch.rand(B, n, n, generator=g, dtype=torch.float64))
    fg = torch.rand(B, n, generator=g) < 0.2
    bg = torch.rand(B, n, generator=g) < 0.4
    fg[:, 0], bg[:, 1] = True, True  # non-empty
    pi_f, pi_b = propagation_scores(T, fg, bg, hops=hops)
    for b in range(B):
        Ta = torch.linalg.matrix_power(T[b], hops)  # dense reference
        ref_f = Ta[fg[b]].mean(0)  # mean over j ∈ P_FG of T^α(j, ·)
        ref_b = Ta[bg[b]].mean(0)
        assert torch.allclose(pi_f[b], ref_f, atol=1e-6, rtol=0)
        assert torch.allclose(pi_b[b], ref_b, atol=1e-6, rtol=0)


def test_propagation_scores_empty_sets_are_zero():
    T = transition_matrix(torch.rand(2, 9, 9))
    empty = torch.zeros(2, 9, dtype=torch.bool)
    pi_f, pi_b = propagation_scores(T, empty, empty)
    assert torch.equal(pi_f, torch.zeros(2, 9)) and torch.equal(pi_b, torch.zeros(2, 9))


# Block-structured scene on an 8×8 grid: the object is the L-shape
# rows 2..6 × cols 2..6 minus its top-right 2×2 corner (rows 2..3, cols 5..6);
# its box is [2, 2, 7, 7] in patch units. Everything else is background.
GRID = 8


def _l_shape() -> torch.Tensor:
    obj = torch.zeros(GRID, GRID, dtype=torch.bool)
    obj[2:7, 2:7] = True
    obj[2:4, 5:7] = False
    return obj.reshape(-1)


# top (3.5, 2.0), left (2.0, 4.5), bottom (4.5, 7.0), right (7.0, 5.5); (x, y) patch units
L_EXTREMES = torch.tensor([[[3.5, 2.0], [2.0, 4.5], [4.5, 7.0], [7.0, 5.5]]])
L_BOX = torch.tensor([[2.0, 2.0, 7.0, 7.0]])


def test_initial_points_on_hand_made_box():
    fg, bg, in_box = initial_points(L_EXTREMES, L_BOX, GRID, delta=0.5)
    # moved inward by 0.5: top (3.5, 2.5) → patch (col 3, row 2) = 19;
    # left (2.5, 4.5) → (2, 4) = 34; bottom (4.5, 6.5) → (4, 6) = 52; right (6.5, 5.5) → (6, 5) = 46
    assert sorted(fg[0].nonzero().flatten().tolist()) == [19, 34, 46, 52]
    # box [2, 7] × [2, 7]: patches whose centre c + 0.5 is inside → rows/cols 2..6
    expect_in = torch.zeros(GRID, GRID, dtype=torch.bool)
    expect_in[2:7, 2:7] = True
    assert torch.equal(in_box[0], expect_in.reshape(-1))
    # entirely outside: a row or a column in {0, 1, 7}
    expect_bg = torch.ones(GRID, GRID, dtype=torch.bool)
    expect_bg[2:7, 2:7] = False
    assert torch.equal(bg[0], expect_bg.reshape(-1))


def test_initial_points_delta_stops_at_centre_and_respects_valid():
    # tiny box [3, 3, 4, 4]: centre (3.5, 3.5); δ = 3 would overshoot, stops at the centre
    pts = torch.tensor([[[3.5, 3.0], [3.0, 3.5], [3.5, 4.0], [4.0, 3.5]]])
    box = torch.tensor([[3.0, 3.0, 4.0, 4.0]])
    valid = torch.ones(1, GRID * GRID, dtype=torch.bool)
    valid[0, :GRID] = False  # first row is crop padding
    fg, bg, in_box = initial_points(pts, box, GRID, delta=3.0, valid=valid)
    assert fg[0].nonzero().flatten().tolist() == [3 * GRID + 3]
    assert not bg[0, :GRID].any() and bg[0, GRID:].sum() == GRID * GRID - GRID - 1
    assert in_box[0].nonzero().flatten().tolist() == [27]


def test_retrieve_from_transition_block_structure():
    obj = _l_shape()  # (64,)
    same = obj[:, None] == obj[None, :]
    S = torch.where(same, 1.0, 1e-3)[None]  # (1, 64, 64) object block vs background block
    T = transition_matrix(S)
    fg, bg, in_box = initial_points(L_EXTREMES, L_BOX, GRID, delta=0.5)
    assert obj[fg[0]].all()  # the moved extreme points lie on the object
    # the paper's rule: hops 3, thresholds 1e-3 / -1e-4 scaled from 1024 tokens to GRID²
    rcfg = RetrievalConfig(hops=3, tau_fg=1e-3, tau_bg=-1e-4, threshold_rule="absolute")
    labels = retrieve_from_transition(T, GridGeometry(fg, bg, in_box, GRID), rcfg)
    assert labels.dtype == torch.int8
    expected = torch.where(obj, 1, 0).to(torch.int8)  # object (all in box) FG, the rest BG
    assert torch.equal(labels[0], expected)
    # 21 object patches minus 4 initial FG, plus the 4 in-box background patches
    assert retrieved_count(labels, fg, bg).tolist() == [17 + 4]


def test_label_points_only_inside_box_and_initial_kept():
    diff = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0]])
    in_box = torch.tensor([[True, True, False, False, True]])
    fg = torch.tensor([[False, False, False, False, True]])
    bg = torch.tensor([[False, False, True, False, False]])
    labels = label_points(diff, fg, bg, in_box, 0.5, -0.5)
    assert labels.tolist() == [[1, 0, 0, -1, 1]]


def test_scale_thresholds():
    tau_fg, tau_bg = scale_thresholds(1e-3, -1e-4, 256)
    assert tau_fg == pytest.approx(4e-3) and tau_bg == pytest.approx(-4e-4)


def test_relative_thresholds_top_and_bottom_20_percent():
    diff = torch.arange(12, dtype=torch.float32)[None]  # in-box values 1..10
    in_box = torch.zeros(1, 12, dtype=torch.bool)
    in_box[0, 1:11] = True
    tau_fg, tau_bg = relative_thresholds(diff, in_box)
    # linear-interpolated quantiles of 1..10: q0.8 = 8.2, q0.2 = 2.8
    assert tau_fg.item() == pytest.approx(8.2) and tau_bg.item() == pytest.approx(2.8)
    no_point = torch.zeros(1, 12, dtype=torch.bool)
    labels = label_points(diff, no_point, no_point, in_box, tau_fg, tau_bg)
    assert labels[0].tolist() == [-1, 0, 0, -1, -1, -1, -1, -1, -1, 1, 1, -1]


def test_point_dropout_keeps_initial_points():
    labels = torch.tensor([[1, 0, -1, 1, 0, 1]], dtype=torch.int8)
    keep = torch.tensor([[True, True, False, False, False, False]])
    out = point_dropout(labels, rate=1.0, keep=keep)
    assert out.tolist() == [[1, 0, -1, -1, -1, -1]]
    assert torch.equal(point_dropout(labels, rate=0.0), labels)


def test_point_dropout_rate_and_reproducible():
    labels = torch.ones(4, 10_000, dtype=torch.int8)
    a = point_dropout(labels, 0.9, generator=torch.Generator().manual_seed(3))
    b = point_dropout(labels, 0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a == -1).float().mean().item() == pytest.approx(0.9, abs=0.01)


def test_rgb_to_lab_known_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T[None, :, :, None]
    lab = rgb_to_lab(rgb)[0, :, :, 0].T  # (3 colours, Lab)
    assert torch.allclose(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=0.05)
    assert torch.allclose(lab[1], torch.zeros(3), atol=1e-4)
    assert torch.allclose(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=0.1)


def test_spatial_and_bilateral_similarity():
    k = spatial_similarity(4, theta_pos=1.5)
    assert k.shape == (16, 16)
    assert k[0, 1].item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)))
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[..., 8:] = 255  # right half white, grid 4 → patch columns 2, 3 are white
    s = bilateral_similarity(img, 4)
    assert s.shape == (1, 16, 16)
    assert torch.allclose(s[0], s[0].T) and torch.allclose(s[0].diagonal(), torch.ones(16))
    # patch 1 (black) vs 0 (black) and 2 (white), both one cell away
    assert s[0, 1, 0] == pytest.approx(k[1, 0].item(), rel=1e-5)
    assert s[0, 1, 2] < 1e-6 * s[0, 1, 0]


def test_similarity_registry():
    rgb = torch.rand(2, 3, 16, 16)
    assert set(SIMILARITY_SOURCES) == {
        "attention", "bilateral", "spatial", "attention_x_bilateral", "tokens",
        "tokens_x_bilateral",
    }  # fmt: skip
    s = compute_similarity("spatial", rgb=rgb, grid=4)
    assert s.shape == (2, 16, 16)
    att = torch.full((2, 16, 16), 0.5)
    both = compute_similarity(
        "attention_x_bilateral", rgb=rgb, grid=4, normalised=rgb, attention_fn=lambda x: att
    )
    assert torch.allclose(both, 0.5 * bilateral_similarity(rgb, 4))
    with pytest.raises(KeyError):
        compute_similarity("nope", rgb=rgb, grid=4)
    with pytest.raises(ValueError):
        compute_similarity("attention", rgb=rgb, grid=4)


def test_token_similarity_known_values():
    # tokens 0 and 1 parallel (cos 1), 0 and 2 orthogonal (cos 0), 0 and 3 opposite (cos -1)
    t = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    s = token_similarity(t, temperature=0.5)
    assert s.shape == (1, 4, 4) and torch.allclose(s[0], s[0].T)
    assert s[0, 0, 1].item() == pytest.approx(1.0)
    assert s[0, 0, 2].item() == pytest.approx(math.exp(-1 / 0.5))
    assert s[0, 0, 3].item() == pytest.approx(math.exp(-2 / 0.5))
    with pytest.raises(ValueError):
        token_similarity(t, temperature=0.0)


def test_tokens_sources_use_tokens_fn():
    rgb = torch.rand(2, 3, 16, 16)
    tokens = torch.randn(2, 16, 8)
    s = compute_similarity(
        "tokens", rgb=rgb, grid=4, normalised=rgb, tokens_fn=lambda x: tokens, token_temperature=0.1
    )
    assert torch.allclose(s, token_similarity(tokens, 0.1))
    both = compute_similarity(
        "tokens_x_bilateral", rgb=rgb, grid=4, normalised=rgb, tokens_fn=lambda x: tokens,
        token_temperature=0.1,
    )  # fmt: skip
    assert torch.allclose(both, s * bilateral_similarity(rgb, 4))
    with pytest.raises(ValueError):
        compute_similarity("tokens", rgb=rgb, grid=4)
