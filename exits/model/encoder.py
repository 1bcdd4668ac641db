"""ViT encoder (any timm ViT), checkpoint loading, and the attention of one block.

- ``ViTEncoder`` wraps a timm ``VisionTransformer`` built with ``pretrained=False`` (weights
  are never downloaded) and returns patch tokens.
- Weights come from bytes (``load_encoder_state``): a local path or ``s3://`` URI is read by
  ``read_bytes``; the MAE ViT-B checkpoint layout loads (wrappers stripped, decoder and
  mask-token keys dropped, position embeddings resampled to the new grid).
- ``block_attention`` recomputes the head-averaged softmax attention of a block over patch
  tokens: timm's fused attention never materialises the matrix.

Token layout: timm puts ``num_prefix_tokens`` (cls/register) tokens first, then the N×N patch
tokens row-major; patch token index = row * N + col.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import Tensor, nn

from exits.storage import read_bytes  # local paths and s3:// URIs

# Wrapper keys of common checkpoint layouts (MAE: {"model": ...}; Lightning: "state_dict").
WRAPPER_KEYS = ("model", "state_dict")
# Keys of an MAE pre-training checkpoint that a plain ViT encoder does not have.
MAE_EXTRA_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.")
# Parameters that must load for a checkpoint to count as matching the architecture.
REQUIRED_PREFIXES = ("patch_embed.", "blocks.")
POS_EMBED_KEY = "pos_embed"
PATCH_EMBED_KEY = "patch_embed.proj.weight"


class ViTEncoder(nn.Module):
    """A timm ViT returning patch tokens.

    Args:
        vit: a timm ``VisionTransformer`` (square ``img_size``, fixed size input).

    Attributes:
        grid: N, patches per side. patch_size: pixels per patch side. embed_dim: D.
        num_prefix_tokens: leading cls/register tokens in the sequence.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        grid_h, grid_w = vit.patch_embed.grid_size
        if grid_h != grid_w:
            raise ValueError(f"square patch grid required, got {grid_h}×{grid_w}")
        self.grid = int(grid_h)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.img_size = self.grid * self.patch_size
        self.embed_dim = int(vit.embed_dim)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.depth = len(vit.blocks)
        self.trainable_blocks = -1

    def set_trainable_blocks(self, k: int) -> ViTEncoder:
        """Train only the last ``k`` blocks and the final norm (-1: everything; 0: frozen).

        Frozen parameters get ``requires_grad=False`` and the frozen part of ``forward`` runs
        under ``torch.no_grad()`` (no activations kept for backward).
        """
        if not -1 <= k <= self.depth:
            raise ValueError(f"trainable_blocks {k} not in [-1, {self.depth}]")
        self.trainable_blocks = k
        self.vit.requires_grad_(k != 0)
        if 0 < k < self.depth:
            first = self.depth - k
            for module in (self.vit.patch_embed, self.vit.norm_pre, *self.vit.blocks[:first]):
                module.requires_grad_(False)
            for name in ("cls_token", "reg_token", "pos_embed"):
                param = getattr(self.vit, name, None)
                if isinstance(param, nn.Parameter):
                    param.requires_grad_(False)
        return self

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) normalised float → patch tokens (B, N², D) after the final norm."""
        k = self.trainable_blocks
        if k == -1 or k == self.depth:
            tokens = self.vit.forward_features(images)  # (B, P + N², D)
            return tokens[:, self.num_prefix_tokens :]
        return self.finish(self.frozen_state(images))

    @property
    def cacheable(self) -> bool:
        """A frozen prefix exists (0 <= trainable_blocks < depth): ``frozen_state`` can be
        computed once per crop and ``finish`` trains on it (stage 1b's token cache)."""
        return 0 <= self.trainable_blocks < self.depth

    @torch.no_grad()
    def frozen_state(self, images: Tensor) -> Tensor:
        """The output of the frozen part, without gradient: the patch tokens (B, N², D) after
        the final norm when the encoder is frozen (k = 0); else the whole token sequence
        (B, P + N², D) entering the first trainable block (k > 0)."""
        if not self.cacheable:
            raise ValueError(f"no frozen prefix with trainable_blocks {self.trainable_blocks}")
        vit, k = self.vit, self.trainable_blocks
        if k == 0:
            return vit.forward_features(images)[:, self.num_prefix_tokens :]
        x = embed_tokens(vit, images)
        for blk in vit.blocks[: self.depth - k]:
            x = blk(x)
        return x

    def finish(self, state: Tensor) -> Tensor:
        """``frozen_state``'s output → patch tokens (B, N², D): the last ``trainable_blocks``
        blocks and the final norm, with gradient (identity for a frozen encoder)."""
        k = self.trainable_blocks
        if not self.cacheable:
            raise ValueError(f"no frozen prefix with trainable_blocks {k}")
        if k == 0:
            return state
        vit = self.vit
        for blk in vit.blocks[self.depth - k :]:
            state = blk(state)
        return vit.norm(state)[:, self.num_prefix_tokens :]


def build_vit(
    model_name: str,
    *,
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    drop_path_rate: float = 0.0,
    **timm_kwargs,
) -> ViTEncoder:
    """Build a timm ViT encoder without downloading anything.

    Args:
        model_name: any timm ViT name, e.g. "vit_base_patch16_224" (its other defaults,
            e.g. qkv_bias, apply; the arguments here override size and shape).
        img_size: S, the square crop size. patch_size: pixels per patch.
        embed_dim, depth, num_heads: transformer shape.
        timm_kwargs: passed to ``timm.create_model``.
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
    vit = timm.create_model(
        model_name,
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        drop_path_rate=drop_path_rate,
        **timm_kwargs,
    )
    return ViTEncoder(vit)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
def parse_checkpoint(data: bytes, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Bytes of a ``torch.save`` file → flat state dict (wrappers removed).

    Loads with ``weights_only=True``; a checkpoint that pickles other objects (MAE's saved
    ``args``) needs ``allow_pickle=True``, for trusted files only.
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a non-tensor object
        if not allow_pickle:
            raise ValueError(
                "checkpoint holds non-tensor objects; pass allow_pickle=True for a trusted file"
            ) from err
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: Mapping) -> dict[str, Tensor]:
    """Strip ``model`` / ``state_dict`` wrappers and a ``module.`` (DDP) prefix."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}


def convert_vit_state_dict(
    state: Mapping[str, Tensor], vit: nn.Module, antialias: bool = True
) -> dict[str, Tensor]:
    """Adapt a ViT (incl. MAE pre-training) state dict to ``vit``.

    Drops MAE decoder / mask-token / classifier keys, resamples the absolute position
    embedding to ``vit``'s grid (``resample_abs_pos_embed``, bicubic, prefix tokens kept;
    ``antialias`` as the weights' origin did it: DINOv2 resamples without) and the
    patch-embedding kernel to its patch size.
    """
    out = {k: v for k, v in state.items() if not k.startswith(MAE_EXTRA_PREFIXES)}
    if POS_EMBED_KEY in out and out[POS_EMBED_KEY].shape != vit.pos_embed.shape:
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        out[POS_EMBED_KEY] = resample_abs_pos_embed(
            out[POS_EMBED_KEY],
            new_size=list(vit.patch_embed.grid_size),
            num_prefix_tokens=prefix,
            antialias=antialias,
        )
    target = vit.patch_embed.proj.weight
    if PATCH_EMBED_KEY in out and out[PATCH_EMBED_KEY].shape[-2:] != target.shape[-2:]:
        out[PATCH_EMBED_KEY] = resample_patch_embed(out[PATCH_EMBED_KEY], list(target.shape[-2:]))
    return out


def load_encoder_state(
    encoder: ViTEncoder, data: bytes, allow_pickle: bool = False, antialias: bool = True
) -> nn.modules.module._IncompatibleKeys:
    """Load pretrained encoder weights from checkpoint bytes (timm or MAE layout).

    Raises:
        ValueError: when keys the architecture needs (patch embedding, blocks) are missing
            or the checkpoint has keys the encoder does not know.
    """
    state = convert_vit_state_dict(parse_checkpoint(data, allow_pickle), encoder.vit, antialias)
    result = encoder.vit.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(REQUIRED_PREFIXES)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match the encoder: missing {missing[:5]}"
            f" unexpected {result.unexpected_keys[:5]}"
        )
    return result


def load_encoder_checkpoint(
    encoder: ViTEncoder,
    uri: str,
    read: Callable[[str], bytes] = read_bytes,
    allow_pickle: bool = False,
    antialias: bool = True,
) -> None:
    """Load pretrained encoder weights from a local path or URI."""
    load_encoder_state(encoder, read(uri), allow_pickle, antialias)


# --------------------------------------------------------------------------------------
# Attention of one block
# --------------------------------------------------------------------------------------
def _as_vit(encoder: nn.Module) -> nn.Module:
    return encoder.vit if isinstance(encoder, ViTEncoder) else encoder


def block_attention(encoder: nn.Module, images: Tensor, block: int) -> Tensor:
    """Head-averaged softmax self-attention of one block over PATCH tokens.

    Runs the ViT up to block ``block`` (0-based index into ``blocks``; the paper's "10th
    layer" of ViT-B is ``block=9``), recomputes q and k from that block's ``norm1`` output
    through ``attn.qkv`` (+ ``q_norm`` / ``k_norm``, ``scale``), takes the softmax over all
    tokens, averages the heads and drops the prefix (cls/register) rows and columns. Later
    blocks are not run. No gradient is blocked: wrap in ``torch.no_grad()`` for a frozen
    extractor.

    Note: the softmax is over all tokens, so after dropping the cls column the rows sum to
    slightly less than 1; Sinkhorn (Eq. 2) renormalises anyway.

    Args:
        encoder: a ``ViTEncoder`` or a timm ``VisionTransformer`` with standard
            ``Attention`` blocks.
        images: (B, 3, S, S) normalised float.
        block: block index in [0, depth).

    Returns:
        (B, N², N²) attention, row i = query patch i, in the input's float dtype.
    """
    vit = _as_vit(encoder)
    if not 0 <= block < len(vit.blocks):
        raise IndexError(f"block {block} out of range for depth {len(vit.blocks)}")
    x = embed_tokens(vit, images)
    for blk in vit.blocks[:block]:
        x = blk(x)
    return _attention_of(vit.blocks[block], x, vit.num_prefix_tokens)


def embed_tokens(vit: nn.Module, images: Tensor) -> Tensor:
    """timm ViT input tokens before the blocks: patch embedding, position embedding (+ prefix
    tokens), patch dropout, pre-norm → (B, T, D), T = P + N²."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))


def _attention_of(blk: nn.Module, x: Tensor, prefix: int) -> Tensor:
    """Head-averaged softmax attention of ``blk`` for its input tokens ``x`` (B, T, D),
    prefix rows/columns dropped: (B, N², N²)."""
    attn = blk.attn
    h = blk.norm1(x)
    B, T, _ = h.shape
    qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, heads, T, hd)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T)
    return weights.mean(dim=1)[:, prefix:, prefix:]  # (B, N², N²)


def tokens_and_attention(encoder: ViTEncoder, images: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """One pass: patch tokens after the final norm (B, N², D) and the attention of ``block``
    (as ``block_attention``). Lets a frozen teacher that shares the similarity extractor's
    encoder weights produce both in one forward (stage 1b on a frozen pretrained encoder)."""
    return continue_with_attention(encoder, embed_tokens(encoder.vit, images), 0, block)


def continue_with_attention(
    encoder: ViTEncoder, x: Tensor, start: int, block: int
) -> tuple[Tensor, Tensor]:
    """``tokens_and_attention`` from the token sequence ``x`` (B, P + N², D) entering block
    ``start`` (``start <= block``): lets the similarity extractor start from a generator's
    cached ``frozen_state`` when their frozen prefixes are equal (``shares_frozen_prefix``)."""
    vit = encoder.vit
    if not 0 <= start <= block < len(vit.blocks):
        raise IndexError(f"need 0 <= start {start} <= block {block} < {len(vit.blocks)}")
    attention = None
    for i, blk in enumerate(vit.blocks[start:], start):
        if i == block:
            attention = _attention_of(blk, x, vit.num_prefix_tokens)
        x = blk(x)
    return vit.norm(x)[:, encoder.num_prefix_tokens :], attention


def frozen_prefix_state(encoder: ViTEncoder) -> dict[str, Tensor]:
    """The parameters ``frozen_state`` depends on: the embedding (patch, position, prefix
    tokens, pre-norm) and the first depth - k blocks; with k = 0 the whole encoder."""
    first = encoder.depth - max(encoder.trainable_blocks, 0)
    out = {}
    for key, value in encoder.vit.state_dict().items():
        if key.startswith("blocks."):
            if int(key.split(".")[1]) >= first:
                continue
        elif key.startswith(("norm.", "fc_norm.", "head")) and first < encoder.depth:
            continue
        out[key] = value
    return out
