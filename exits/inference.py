"""Generator inference on instance crops: the batched torch call and a numpy convenience loop.

``predict_probs`` (batched torch; what a Ray actor calls) maps uint8 crops to mask
probabilities at the generator's resolution; ``masks_for_rows`` (numpy convenience) crops,
predicts and pastes back full-resolution masks for a list of instance-table rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from exits import storage
from exits.config import LabelConfig
from exits.data.crops import INFERENCE_ENLARGE, crop_and_resize, enlarge_box, paste_mask, row_box
from exits.data.images import load_image
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
                cache[row["file_name"]] = load_image(storage.join(images, row["file_name"]))
            crop, crop_box, box = crop_instance(cache[row["file_name"]], row, size, enlarge)
            crops.append(crop)
            geoms.append((crop_box, box))
        probs = predict_probs(model, np.stack(crops), device)
        for row, p, (crop_box, box) in zip(chunk, probs, geoms):
            yield row, paste_mask(p, crop_box, (row["height"], row["width"]), box=box)
