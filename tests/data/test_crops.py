"""Crop geometry: inverse maps, crop->paste round trip within 1 px, enlargement statistics."""

import cv2
import numpy as np

from exits.data.crops import (
    box_mask_in_crop,
    crop_and_resize,
    crop_to_image,
    enlarge_box,
    image_to_crop,
    paste_mask,
    random_enlarge_box,
)


def test_enlarge_box_fixed():
    np.testing.assert_allclose(enlarge_box(np.array([10, 20, 30, 60]), 1.5), [5, 10, 35, 70])


def test_random_enlarge_mean_and_max():
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([0.0, 0.0, 100.0, 50.0]), (20000, 1))
    out = random_enlarge_box(boxes, rng)
    fx = (out[:, 2] - out[:, 0]) / 100
    fy = (out[:, 3] - out[:, 1]) / 50
    assert abs(fx.mean() - 1.3) < 0.01 and abs(fy.mean() - 1.3) < 0.01
    assert fx.max() <= 1.6 + 1e-9 and fx.min() >= 1.0
    assert np.all(out[:, 0] <= 0) and np.all(out[:, 2] >= 100)


def test_point_maps_are_inverse():
    crop_box = np.array([-7.5, 3.25, 40.0, 90.0])
    p = np.array([[0, 0], [12, 44], [39, 89]], dtype=float)
    np.testing.assert_allclose(
        crop_to_image(image_to_crop(p, crop_box, 64), crop_box, 64), p, atol=1e-9
    )
    # the box's edges map to the crop's edges: edge x0 -> u = -0.5 (pixel-index convention)
    np.testing.assert_allclose(
        image_to_crop(np.array([[-8.0, 2.75]]), crop_box, 64), [[-0.5, -0.5]]
    )


def test_crop_identity_and_padding():
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    crop, valid = crop_and_resize(img, np.array([0, 0, 16, 16]), 16)
    np.testing.assert_array_equal(crop, img)
    assert valid.all()
    crop, valid = crop_and_resize(img, np.array([-8, 0, 8, 16]), 16)
    assert not valid[:, :8].any() and valid[:, 8:].all()
    assert (crop[:, :7] == 0).all()
    np.testing.assert_array_equal(crop[:, 8:], img[:, :8])


def test_crop_paste_round_trip_within_one_pixel():
    h, w = 120, 150
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (70, 60), (30, 18), 25, 0, 360, 1, -1)
    cv2.rectangle(mask, (40, 70), (55, 95), 1, -1)
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    crop_box = enlarge_box(box, 1.3)
    size = 128
    crop, _ = crop_and_resize(mask[..., None].repeat(3, 2) * 255, crop_box, size)
    for k in (1, 2):  # paste at S and at S/2 resolution
        small = cv2.resize(
            crop[..., 0].astype(np.float32) / 255,
            (size // k, size // k),
            interpolation=cv2.INTER_AREA,
        )
        back = paste_mask(small, crop_box, (h, w), box=box) >= 0.5
        diff = back ^ mask.astype(bool)
        kernel = np.ones((3, 3), np.uint8)
        boundary = cv2.dilate(mask, kernel) ^ cv2.erode(mask, kernel)
        assert np.all(boundary[diff] == 1), (
            "pasted mask differs from GT away from the 1-px boundary"
        )
        assert diff.sum() < 0.1 * mask.sum()


def test_paste_zero_outside_box():
    probs = np.ones((16, 16), np.float32)
    out = paste_mask(probs, np.array([0, 0, 40, 40]), (50, 50), box=np.array([10, 10, 30, 30]))
    assert out[10:30, 10:30].min() == 1 and out.sum() == 400


def test_box_mask_in_crop():
    m = box_mask_in_crop(np.array([10, 10, 30, 30]), np.array([0, 0, 40, 40]), 4)
    np.testing.assert_array_equal(m, [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
