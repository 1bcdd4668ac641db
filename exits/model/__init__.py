"""Models: ViT encoder, MAL mask decoder, pseudo-label generator and similarity extractor."""

from exits.model.decoder import MaskDecoder
from exits.model.encoder import ViTEncoder, block_attention, build_vit, load_encoder_state
from exits.model.generator import (
    ATTENTION_BLOCKS,
    GENERATORS,
    PseudoLabelGenerator,
    SimilarityExtractor,
    build_generator,
    build_similarity_extractor,
    ema_update,
    make_teacher,
)

__all__ = [
    "ATTENTION_BLOCKS",
    "GENERATORS",
    "MaskDecoder",
    "PseudoLabelGenerator",
    "SimilarityExtractor",
    "ViTEncoder",
    "block_attention",
    "build_generator",
    "build_similarity_extractor",
    "build_vit",
    "ema_update",
    "load_encoder_state",
    "make_teacher",
]
