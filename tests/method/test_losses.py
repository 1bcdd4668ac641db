"""Known-answer tests for exits.method.losses (paper Eq. 1, 6-10)."""

import math

import pytest
import torch

from exits.method.losses import (
    balanced_bce,
    box_only_loss,
    crf_loss,
    dice_loss,
    point_loss,
    point_targets,
    projection_mil_loss,
    total_loss,
)

EPS = 1e-3  # MAL's dice smoothing, added to each squared sum


def test_dice_hand_computed():
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # sample 0: Σpt = 0.5, Σp² = 0.5, Σt² = 1 → 1 − 1 / 1.5 = 1/3; sample 1: perfect → 0
    per = dice_loss(pred, target, eps=0.0, reduction="none")
    assert per.tolist() == pytest.approx([1 / 3, 0.0])
    assert dice_loss(pred, target, eps=0.0).item() == pytest.approx(1 / 6)
    # with eps: 1 − 1 / (0.5 + 1 + 2e-3)
    assert dice_loss(pred[:1], target[:1]).item() == pytest.approx(1 - 1 / (1.5 + 2 * EPS))


# M and the box of the MIL example (3×3).
M = torch.tensor([[[0.2, 0.9, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 0.0]]])
BOX = torch.tensor([[[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])


def test_projection_mil_hand_computed():
    # Proj_x (max of each column): M → [0.2, 0.9, 0], box → [0, 1, 1]
    #   Σpt = 0.9, Σp² = 0.85, Σt² = 2 → 1 − 1.8 / (2.85 + 2·eps)
    # Proj_y (max of each row):    M → [0.9, 0.4, 0], box → [1, 1, 0]
    #   Σpt = 1.3, Σp² = 0.97, Σt² = 2 → 1 − 2.6 / (2.97 + 2·eps)
    expected = (1 - 1.8 / (2.85 + 2 * EPS)) + (1 - 2.6 / (2.97 + 2 * EPS))
    assert projection_mil_loss(M, BOX).item() == pytest.approx(expected, rel=1e-6)
    # (B, 1, H, W) input is accepted too
    assert projection_mil_loss(M[:, None], BOX[:, None]).item() == pytest.approx(expected, rel=1e-6)
    # a mask equal to the box has (nearly) zero loss
    assert projection_mil_loss(BOX, BOX).item() == pytest.approx(0.0, abs=1e-3)


def _point_example():
    # 4×4 prediction, grid 2: each 2×2 block is constant so M̃ = [0.8, 0.2, 0.6, 0.0]
    m_tilde = torch.tensor([[0.8, 0.2], [0.6, 0.0]])
    probs = m_tilde.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]  # (1, 1, 4, 4)
    labels = torch.tensor([[1, 0, -1, 1]], dtype=torch.int8)
    box = torch.zeros(1, 4, 4)
    box[:, :, :2] = 1.0
    return probs, labels, box


def test_point_targets():
    y_hat, k = point_targets(torch.tensor([[1, 0, -1, 1]], dtype=torch.int8))
    assert y_hat.tolist() == [[1.0, 0.0, 0.0, 1.0]] and k.tolist() == [[1.0, 1.0, 0.0, 1.0]]


def test_point_loss_hand_computed():
    probs, labels, box = _point_example()
    # K = [1, 1, 0, 1], Ŷ = [1, 0, 0, 1]; M̃ ⊙ K = [0.8, 0.2, 0, 0]
    # Σpt = 0.8, Σp² = 0.68, Σt² = 2 → 1 − 1.6 / (2.68 + 2·eps)
    expected = 1 - 1.6 / (2.68 + 2 * EPS)
    loss = point_loss(probs, labels, box, retrieved_count=torch.tensor([3]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_point_loss_without_retrieved_points_adds_mil():
    probs, labels, box = _point_example()
    lam = 4.0
    loss = point_loss(probs, labels, box, retrieved_count=torch.tensor([0]), lambda_mil=lam)
    dice = 1 - 1.6 / (2.68 + 2 * EPS)
    expected = dice + lam * projection_mil_loss(probs[:, 0], box).item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_point_loss_indicator_is_per_sample():
    probs, labels, box = _point_example()
    probs2, labels2, box2 = (torch.cat([t, t]) for t in (probs, labels, box))
    both = point_loss(probs2, labels2, box2, retrieved_count=torch.tensor([0, 5]))
    with_mil = point_loss(probs, labels, box, retrieved_count=torch.tensor([0]))
    without = point_loss(probs, labels, box, retrieved_count=torch.tensor([5]))
    assert both.item() == pytest.approx((with_mil.item() + without.item()) / 2, rel=1e-6)


def test_balanced_bce_and_switch():
    probs = torch.tensor([[0.8, 0.2, 0.5]])
    labels = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    # FG term −log 0.8, BG term −log(1 − 0.2) → mean −log 0.8; the unlabelled point is ignored
    assert balanced_bce(probs, labels).item() == pytest.approx(-math.log(0.8), rel=1e-6)
    p, lab, box = _point_example()
    base = point_loss(p, lab, box, torch.tensor([1]))
    with_bce = point_loss(p, lab, box, torch.tensor([1]), balanced_bce_weight=0.5)
    m_tilde = torch.tensor([[0.8, 0.2, 0.6, 0.0]])
    extra = 0.5 * balanced_bce(m_tilde, lab).item()
    assert with_bce.item() == pytest.approx(base.item() + extra, rel=1e-5)


def test_crf_loss_uses_detached_refined_average():
    g = torch.Generator().manual_seed(0)
    student = torch.rand(2, 1, 4, 4, generator=g).requires_grad_()
    teacher = torch.rand(2, 1, 4, 4, generator=g)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    seen = {}

    def identity_crf(imgs, probs):
        seen["shape"], seen["dtype"] = tuple(imgs.shape), imgs.dtype
        return probs

    loss = crf_loss(student, teacher, images, identity_crf, binarize=False)
    assert seen == {"shape": (2, 3, 4, 4), "dtype": torch.uint8}  # images resized to M
    expected = dice_loss(student.detach(), (student.detach() + teacher) / 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0

    binary = crf_loss(student, teacher, images, identity_crf)  # MAL: target thresholded at 0.5
    target = ((student.detach() + teacher) / 2 > 0.5).float()
    assert binary.item() == pytest.approx(dice_loss(student.detach(), target).item(), rel=1e-6)


def test_total_and_box_only():
    a, b = torch.tensor(0.5), torch.tensor(0.25)
    assert total_loss(a, b, lambda_point=2.0, lambda_crf=4.0).item() == pytest.approx(2.0)
    assert box_only_loss(a, b, lambda_mil=4.0, lambda_crf=0.5).item() == pytest.approx(2.125)
