"""Known answers for ExtremeNet's extreme-point protocol (hand-traced in the comments)."""

import numpy as np
import pytest

from exits.data.extreme_points import (
    box_from_extreme_points,
    extreme_points_from_mask,
    extreme_points_from_polygons,
    validate_extreme_points,
)


def test_diamond_polygon():
    # vertices (10,0) (20,10) (10,20) (0,10): each extreme is a single vertex
    pts = extreme_points_from_polygons([[10, 0, 20, 10, 10, 20, 0, 10]])
    assert pts.dtype == np.int32
    np.testing.assert_array_equal(pts, [[10, 0], [0, 10], [10, 20], [20, 10]])


def test_square_polygon_ties_use_run_midpoint_and_padding_quirk():
    # (0,0) (10,0) (10,10) (0,10); padded list: [(0,10),(0,0),(10,0),(10,10),(0,10),(0,0)]
    # top: argmin y = idx1, run {1,2} -> x mid (0+10)//2 = 5          -> (5, 0)
    # bottom: argmax y = idx0 (the padded copy of the last vertex), run {0} -> (0, 10)
    # left: argmin x = idx0, run {0,1} -> y mid 5                     -> (0, 5)
    # right: argmax x = idx2, run {2,3} -> y mid 5                    -> (10, 5)
    pts = extreme_points_from_polygons([[0, 0, 10, 0, 10, 10, 0, 10]])
    np.testing.assert_array_equal(pts, [[5, 0], [0, 5], [0, 10], [10, 5]])


def test_multiple_polygons_are_concatenated_in_order():
    # two triangles; the bottom-most vertex (4, 30) is in the second polygon
    pts = extreme_points_from_polygons([[0, 5, 10, 0, 8, 9], [2, 20, 9, 22, 4, 30]])
    np.testing.assert_array_equal(pts, [[10, 0], [0, 5], [4, 30], [10, 0]])


def test_rectangle_mask_row_major():
    # pixels x in [2,6], y in [1,3], row-major; padded with (6,3) in front and (2,1) at the back
    # top: idx1 (2,1), run over row 1 -> x mid (2+6)//2 = 4          -> (4, 1)
    # bottom: argmax y = idx0 (6,3), forward neighbour has y=1        -> (6, 3)
    # left: argmin x = idx1 (2,1), neighbours x=3 and x=6 (tol 0.1)   -> (2, 1)
    # right: argmax x = idx0 (6,3)                                    -> (6, 3)
    m = np.zeros((6, 9), bool)
    m[1:4, 2:7] = True
    np.testing.assert_array_equal(extreme_points_from_mask(m), [[4, 1], [2, 1], [6, 3], [6, 3]])


def test_two_component_mask():
    # pixels (1,1) (2,1) | (5,4) (6,4); padded [(6,4),(1,1),(2,1),(5,4),(6,4),(1,1)]
    m = np.zeros((6, 8), bool)
    m[1, 1:3] = True
    m[4, 5:7] = True
    np.testing.assert_array_equal(extreme_points_from_mask(m), [[1, 1], [1, 1], [6, 4], [6, 4]])


def test_thin_vertical_line_is_found_and_flagged_degenerate():
    m = np.zeros((10, 10), bool)
    m[2:8, 3] = True
    pts = extreme_points_from_mask(m)
    # left/right: every pixel ties at x=3, the run spans y 2..7 -> mid (2+7)//2 = 4
    np.testing.assert_array_equal(pts, [[3, 2], [3, 4], [3, 7], [3, 4]])
    assert "degenerate" in validate_extreme_points(pts, 10, 10)


def test_tolerance_run_extends_within_two_percent():
    # 100 px tall: tol 0.02 * 100 = 2 px; top vertices at y=0 and y=2 join one run, y=3 does not
    poly = [[0, 50, 40, 2, 50, 0, 60, 2, 70, 3, 100, 50, 50, 99]]
    pts = extreme_points_from_polygons(poly)
    assert pts[0].tolist() == [(40 + 60) // 2, 0]


def test_box_from_extreme_points():
    pts = np.array([[5, 2], [1, 6], [4, 9], [8, 5]])
    np.testing.assert_array_equal(box_from_extreme_points(pts), [1, 2, 9, 10])


@pytest.mark.parametrize(
    "points,reason",
    [
        ([[5, 2], [1, 6], [4, 9], [80, 5]], "outside"),
        ([[5, 9], [1, 6], [4, 2], [8, 5]], "top point is below"),
        ([[5, 2], [8, 6], [4, 9], [1, 5]], "left point is right"),
        ([[5, 5], [5, 5], [5, 5], [5, 5]], "degenerate"),
        ([[5, 2], [1, 6], [4, 9]], "shape"),
        ([[5, 2], [1, 6], [4, 1], [8, 5]], "top point is below"),
        ([[5, 2], [1, 6], [4, 9], [8, float("nan")]], "NaN"),
    ],
)
def test_validate_reasons(points, reason):
    assert reason in validate_extreme_points(np.array(points, dtype=float), 20, 20)


def test_validate_accepts_good_points():
    assert validate_extreme_points(np.array([[5, 2], [1, 6], [4, 9], [8, 5]]), 20, 20) is None


def test_python_path_equals_numpy_path(monkeypatch):
    """Polygon-sized point lists take a plain-Python path; it must give the numpy result."""
    from exits.data import extreme_points as ep

    rng = np.random.default_rng(1)
    cases = []
    for t in range(600):
        k = int(rng.integers(1, 300))
        pts = rng.integers(0, 50, (k, 2)).astype(float)  # many ties
        cases.append(pts if t % 2 else np.round(rng.uniform(0, 500, (k, 2)), 2))
    fast = [ep._extreme_points(p) for p in cases]
    monkeypatch.setattr(ep, "PYTHON_PATH_MAX_POINTS", 0)
    for pts, got in zip(cases, fast):
        np.testing.assert_array_equal(got, ep._extreme_points(pts))
