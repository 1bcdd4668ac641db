"""Stage 1b on a (partly) frozen encoder: run the frozen part on each training crop once per
*view*, then train the rest on the cached output.

With ``model.trainable_blocks = k`` (0 <= k < depth) the encoder's patch embedding and first
depth - k blocks are frozen, so their output for a crop (``ViTEncoder.frozen_state``: the
final patch tokens when k = 0, the token sequence entering the first trainable block when
k > 0) never changes during training, and neither do the frozen extractor's attention and
the points Eq. 2-5 retrieve from it. The uncached loop still pays two encoder passes per crop
and step (student on the augmented crop, teacher on the clean one): measured 2.2 s of a 2.8 s
step (16 crops, ViT-S/14 224², 2 CPU threads, k = 0). Here a view = one draw of the
geometric augmentation (the dataset's random enlargement and flip at epoch seed v); each crop
is encoded once per view, its retrieval labels computed then, and epoch e trains on view
e mod V: per crop and step the last k blocks and the decoder run with gradient (student) and
once without (the EMA teacher's own last k blocks and decoder). With k = 0 and an extractor
whose frozen encoder equals the generator's (``shares_frozen_encoder``) one pass per view
gives both the tokens and the attention; with k > 0 an extractor that shares the frozen
prefix (``shares_frozen_prefix``: stage 1a trained the same last k blocks) continues from the
cached state through its own last blocks; otherwise it runs its own pass.

What differs from the uncached loop, by design: the student reads the clean crop's state (no
photometric augmentation: it would need an encoder pass per step); point dropout is still
drawn per step. Memory: per crop and view the state ((P +) N² x D fp16: 197 KB for ViT-S/14 224²)
plus small tensors (crop at the prediction resolution for the CRF, labels): for small datasets
(the CPU real-photo profile), not LVIS; ``generator.cache_views: 0`` (default) is the
uncached loop.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from exits.config import LossConfig, RetrievalConfig
from exits.data.transforms import normalize
from exits.method.losses import resize_images
from exits.method.retrieval import grid_geometry
from exits.model.encoder import continue_with_attention, tokens_and_attention
from exits.train.data import CropDataset
from exits.train.steps import box_mask_at, objective, point_labels

TOKEN_DTYPE = torch.float16


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This worker's dataset items: every ``world``-th from ``rank``."""
    return list(range(rank, n, world))


@torch.no_grad()
def encode_views(
    teacher: nn.Module,
    extractor: nn.Module | None,
    dataset: CropDataset,
    indices: list[int],
    views: int,
    rcfg: RetrievalConfig,
    lcfg: LossConfig,
    batch_size: int,
    device: torch.device,
    shared: bool = False,
    on_view=None,
) -> dict[str, Tensor]:
    """Encode ``indices`` of ``dataset`` under ``views`` geometric augmentations.

    ``teacher``: a generator whose encoder has a frozen part; ``shared``: the extractor's
    weights equal that part (``shares_frozen_prefix``), so the extractor's tokens and
    attention come from the same pass (k = 0) or continue from the cached state through its
    own last blocks (k > 0). Returns tensors with a leading (views * len(indices)) axis,
    view-major: state (the encoder's ``frozen_state``: (N², D) or (P + N², D)) fp16, image
    (3, h, h) uint8 (the crop at the prediction resolution, the CRF's input), box (1, h, h)
    float, labels (N²) int8 and keep (N²) bool (Eq. 2-5's output before dropout and
    the initial points; absent for the box-only objective). ``on_view(v)`` after each view.
    """
    model = getattr(teacher, "module", teacher)
    h = model.img_size // model.output_stride
    grid = model.grid
    # the extractor's attention from this very encoder pass when they share the frozen part
    block = getattr(extractor, "attention_block", None) if shared else None
    trainable = model.encoder.trainable_blocks
    out: dict[str, list[Tensor]] = {"state": [], "image": [], "box": [], "labels": [], "keep": []}
    for v in range(views):
        dataset.set_epoch(v)
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start : start + batch_size]]
            batch = {k: t.to(device) for k, t in torch.utils.data.default_collate(items).items()}
            clean = normalize(batch["image"].float() / 255.0)
            if block is not None:
                if trainable == 0:
                    state, attention = tokens_and_attention(model.encoder, clean, block)
                    precomputed = (state, attention)
                else:  # the extractor continues from this frozen prefix: its last blocks only
                    state = model.encoder.frozen_state(clean)
                    precomputed = continue_with_attention(
                        extractor.encoder, state, model.encoder.depth - trainable, block
                    )
            else:
                state, precomputed = model.encoder.frozen_state(clean), None
            out["state"].append(state.to(TOKEN_DTYPE).cpu())
            out["image"].append(resize_images(batch["image"], (h, h)).cpu())
            out["box"].append(box_mask_at(batch, h).cpu())
            if lcfg.objective == "exits":
                geo = grid_geometry(batch, grid, rcfg.delta)
                labels = point_labels(batch, clean, grid, extractor, rcfg, geo, precomputed)
                out["labels"].append(labels.cpu())
                out["keep"].append((geo.fg | geo.bg).cpu())
        if on_view is not None:
            on_view(v)
    return {k: torch.cat(t) for k, t in out.items() if t}


def view_batches(
    cache: dict[str, Tensor], epoch: int, views: int, batch_size: int, steps: int, skip: int,
    seed: int,
):  # fmt: skip
    """Yield ``steps - skip`` batches (dicts of cache rows) of view ``epoch % views``, in an
    order drawn from (seed, epoch): the same after a resume, so ``skip`` resumes mid-epoch.
    The cache holds ``views`` equal blocks of rows, view-major (``encode_views``)."""
    n_items = len(next(iter(cache.values()))) // views
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_items, generator=g) + (epoch % views) * n_items
    for s in range(skip, steps):
        rows = order[s * batch_size : (s + 1) * batch_size]
        yield {k: t[rows] for k, t in cache.items()}


def cached_generator_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict[str, Tensor],
    rcfg: RetrievalConfig,
    lcfg: LossConfig,
    crf_fn,
    device: torch.device,
) -> tuple[Tensor, dict]:
    """Stage 1b's objective (Eq. 10 or box-only) on one batch of cached views: the same
    ``objective`` as the uncached ``generator_loss``; only the trainable blocks (if any) and the
    decoder run."""
    state = batch["state"].to(device).float()
    probs = student(state=state).sigmoid()
    with torch.no_grad():
        teacher_probs = teacher(state=state).sigmoid()
    points = None
    if lcfg.objective == "exits":
        points = (batch["labels"].to(device), batch["keep"].to(device))
    box = batch["box"].to(device)
    return objective(
        probs, teacher_probs, box, batch["image"].to(device), points, rcfg, lcfg, crf_fn
    )


__all__ = ["cached_generator_loss", "encode_views", "shard_indices", "view_batches"]
