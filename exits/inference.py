"""Generator inference on instance crops: the ONE crop -> logits -> full-resolution mask path.

``predict_logits`` (batched torch; what the labeller's Ray actors call) maps uint8 crops to
logits at the generator's resolution; ``paste_probs`` / ``mask_from_logits`` turn one crop's
logits into a full-resolution probability / thresholded mask (sigmoid, bilinear paste, zero
outside the box), used by the labeller (``exits.label.stages.paste_masks``) and by
``masks_for_rows``, the numpy convenience loop behind the stage-1b held-out metric.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from exits.config import LabelConfig
from exits.data.crops import INFERENCE_ENLARGE, crop_and_resize, enlarge_box, paste_mask, row_box
from exits.data.images import load_image_under
from exits.data.transforms import normalize, to_tensor


@torch.inference_mode()
def predict_logits(
    model: nn.Module, crops: torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Batched torch call: (B, S, S, 3) uint8 crops (any device) -> (B, h, h) float32 logits on
    ``device`` (h = S / 4). bf16 autocast on CUDA, float32 on CPU."""
    device = torch.device(device)
    x = normalize(to_tensor(crops.to(device, non_blocking=True)))  # (B, 3, S, S)
    with torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    ):
        logits = model(x)  # (B, 1, h, h)
    return logits[:, 0].float()


def predict_probs(
    model: nn.Module, crops: np.ndarray, device: torch.device | str = "cpu"
) -> np.ndarray:
    """numpy convenience: (B, S, S, 3) uint8 crops -> (B, h, h) float32 probabilities."""
    crops_t = torch.from_numpy(np.ascontiguousarray(crops))
    return predict_logits(model, crops_t, device).sigmoid().cpu().numpy()


def paste_probs(
    logits: np.ndarray, box: np.ndarray, crop_box: np.ndarray, image_hw: tuple[int, int]
) -> np.ndarray:
    """(h, w) crop-space logits -> (H, W) float32 probabilities, 0 outside ``box``.

    Sigmoid, then bilinear paste through the inverse crop map (``crops.paste_mask``).
    """
    prob = expit(logits.astype(np.float32))  # (h, w); no overflow warning for large −logits
    return paste_mask(prob, crop_box, image_hw, box=box)  # (H, W)


def mask_from_logits(
    logits: np.ndarray,
    box: np.ndarray,
    crop_box: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float,
) -> tuple[np.ndarray, float]:
    """(h, w) crop-space logits -> (H, W) bool mask confined to ``box`` and its score.

    Sigmoid, bilinear paste through the inverse crop map (zero outside the box), threshold.
    The score is the mean probability inside the mask (0 for an empty mask).
    """
    full = paste_probs(logits, box, crop_box, image_hw)  # (H, W) float32, 0 outside the box
    mask = full >= threshold
    score = float(full[mask].mean()) if mask.any() else 0.0
    return mask, score


def crop_instance(
    image: np.ndarray, row: dict, size: int, enlarge: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crop (S, S, 3) uint8, crop_box, box) at the fixed inference enlargement."""
    box, _ = row_box(row)
    crop_box = enlarge_box(box, enlarge)
    crop, _ = crop_and_resize(image, crop_box, size)
    return crop, crop_box, box


def masks_for_rows(
    model: nn.Module,
    rows: list[dict],
    images: str,
    size: int,
    enlarge: float = INFERENCE_ENLARGE,
    batch_size: int = LabelConfig.batch_size,
    device: str = "cpu",
) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield (row, full-resolution probability mask (H, W) float32, zero outside the box)."""
    cache: dict[str, np.ndarray] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        crops, geoms = [], []
        for row in chunk:
            if row["file_name"] not in cache:
                cache.clear()  # rows are grouped by image in practice; keep one image
                cache[row["file_name"]] = load_image_under(images, row["file_name"])
            crop, crop_box, box = crop_instance(cache[row["file_name"]], row, size, enlarge)
            crops.append(crop)
            geoms.append((crop_box, box))
        crops_t = torch.from_numpy(np.stack(crops))  # (B, S, S, 3) uint8
        logits = predict_logits(model, crops_t, device).cpu().numpy()  # (B, h, h)
        for row, lg, (crop_box, box) in zip(chunk, logits, geoms):
            yield row, paste_probs(lg, box, crop_box, (row["height"], row["width"]))
