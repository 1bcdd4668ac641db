"""MAL's mask decoder (Lan et al., "Vision Transformers are Good Mask Auto-Labelers").

Query ("RoI head"): global-average-pooled patch tokens → Linear(D, C) → ReLU → Linear(C, C).
Pixel features ("mask head"): tokens reshaped to (B, D, N, N) → 4 conv3×3(C) each followed
by ReLU, with one bilinear ×2 upsample before the last conv (MAL's ``idx == 3``) → (B, C,
2N, 2N). Mask logits = query · pixel features (an einsum over C).

Output resolution (our choice, documented): the logits are resized bilinearly to
``out_size``; the generator asks for S/4. With patch 16 (paper) 2N = S/8, so this is MAL's
final ×2 upsample of the logits; with patch 8 (demo) 2N = S/4 already and no resize happens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIDDEN_DIM = 256
NUM_CONVS = 4
UPSAMPLE_BEFORE_CONV = 3  # MAL upsamples the features before its 4th conv
FEATURE_UPSAMPLE = 2
CONV_KERNEL = 3


class MaskDecoder(nn.Module):
    """Mask decoder: patch tokens → one mask logit map.

    Args:
        in_dim: D, token width of the encoder.
        hidden_dim: C, width of the query and of the pixel features (MAL: 256).
        num_convs: pixel-feature convolutions (MAL: 4).
        upsample_before_conv: index of the conv preceded by the ×2 upsample.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        hidden_dim: int = HIDDEN_DIM,
        num_convs: int = NUM_CONVS,
        upsample_before_conv: int = UPSAMPLE_BEFORE_CONV,
    ) -> None:
        super().__init__()
        if not 0 <= upsample_before_conv < num_convs:
            raise ValueError("upsample_before_conv must index one of the convs")
        self.query_mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.convs = nn.ModuleList(
            nn.Conv2d(in_dim if i == 0 else hidden_dim, hidden_dim, CONV_KERNEL, padding=1)
            for i in range(num_convs)
        )
        self.upsample_before_conv = upsample_before_conv

    def pixel_features(self, tokens: Tensor, grid: int) -> Tensor:
        """(B, N², D) → (B, C, 2N, 2N)."""
        B, n, D = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, D, grid, grid)  # (B, D, N, N)
        for i, conv in enumerate(self.convs):
            if i == self.upsample_before_conv:
                x = F.interpolate(
                    x, scale_factor=FEATURE_UPSAMPLE, mode="bilinear", align_corners=False
                )
            x = F.relu(conv(x))
        return x

    def forward(self, tokens: Tensor, grid: int, out_size: int) -> Tensor:
        """Mask logits.

        Args:
            tokens: (B, N², D) patch tokens, row-major.
            grid: N.
            out_size: side of the output logits (the generator passes S/4).

        Returns:
            (B, 1, out_size, out_size) logits.
        """
        if tokens.shape[1] != grid * grid:
            raise ValueError(f"expected {grid * grid} tokens, got {tokens.shape[1]}")
        query = self.query_mlp(tokens.mean(dim=1))  # (B, C)
        feats = self.pixel_features(tokens, grid)  # (B, C, 2N, 2N)
        logits = torch.einsum("bc,bchw->bhw", query, feats)[:, None]  # (B, 1, 2N, 2N)
        if logits.shape[-1] != out_size:
            logits = F.interpolate(
                logits, size=(out_size, out_size), mode="bilinear", align_corners=False
            )
        return logits
