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
uncached loop. The cache lives in the worker's memory, so a configuration whose cache would
exceed ``generator.cache_max_gb`` per worker (default: half the node's memory shared by the
workers on it) is refused before anything is encoded (:func:`check_token_cache`), by the
driver before Ray Train starts when the limit is set, and by each worker against its node.
"""

from __future__ import annotations

import math
import os

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
# share of a node's memory the token caches of the workers on it may take when
# generator.cache_max_gb is 0 (the rest: model, optimiser, loader processes, the object store)
CACHE_MEMORY_FRACTION = 0.5


def crop_cache_bytes(
    grid: int, embed_dim: int, prefix_tokens: int, out_size: int, points: bool
) -> int:
    """Bytes one crop holds per view in ``encode_views``' cache.

    state (T, D) fp16 with T = N² (frozen encoder, k = 0) or P + N² (k > 0: ``prefix_tokens``
    = P, else pass 0): 2·T·D; image (3, h, h) uint8: 3h²; box (1, h, h) float32: 4h²; with
    the point objective labels (N²) int8 + keep (N²) bool: 2N². ``out_size`` = h = S / stride.
    """
    tokens = prefix_tokens + grid * grid
    size = 2 * tokens * embed_dim + 3 * out_size**2 + 4 * out_size**2
    return size + (2 * grid * grid if points else 0)


def model_crop_cache_bytes(model: nn.Module, points: bool) -> int:
    """``crop_cache_bytes`` of a generator (also one built on the meta device)."""
    model = getattr(model, "module", model)
    enc = model.encoder
    prefix = enc.num_prefix_tokens if enc.trainable_blocks > 0 else 0
    return crop_cache_bytes(
        enc.grid, enc.embed_dim, prefix, model.img_size // model.output_stride, points
    )


def node_memory_bytes() -> int:
    """Physical memory of this node."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_limit(cache_max_gb: float, node_memory: int, workers_on_node: int) -> tuple[int, str]:
    """(bytes, how it was set): ``cache_max_gb`` x 1e9 when > 0, else
    ``CACHE_MEMORY_FRACTION`` of ``node_memory`` shared by ``workers_on_node``."""
    if cache_max_gb > 0:
        return int(cache_max_gb * 1e9), f"generator.cache_max_gb = {cache_max_gb:g}"
    limit = int(CACHE_MEMORY_FRACTION * node_memory / max(1, workers_on_node))
    return limit, (
        f"generator.cache_max_gb = 0: {CACHE_MEMORY_FRACTION:g} x {node_memory / 1e9:.1f} GB"
        f" node memory / {max(1, workers_on_node)} worker(s) on the node"
    )


def check_token_cache(views: int, crops: int, crop_bytes: int, limit: int, source: str) -> int:
    """The bytes a worker's cache of ``views`` x ``crops`` x ``crop_bytes`` needs; raises
    ValueError naming that size and the limit when it is over ``limit`` (bytes)."""
    need = views * crops * crop_bytes
    if need > limit:
        raise ValueError(
            f"generator.cache_views = {views} needs a token cache of {views} views x {crops:,}"
            f" crops per worker x {crop_bytes:,} bytes per crop = {need / 1e9:.3g} GB per"
            f" worker, over the limit of {limit / 1e9:.3g} GB ({source}); lower"
            " generator.cache_views, add workers (generator.num_workers), raise"
            " generator.cache_max_gb, or set generator.cache_views = 0 (the uncached loop)"
        )
    return need


def check_run_token_cache(instances: str, model_cfg, crop_size: int, tcfg, points: bool) -> None:
    """Driver-side check before Ray Train starts: the table's row count (Parquet footers), the
    model's shapes (built on the meta device: no weights) and an explicit
    ``generator.cache_max_gb`` (the default limit depends on the workers' nodes: each worker
    checks it before encoding)."""
    if tcfg.cache_views <= 0 or tcfg.cache_max_gb <= 0:
        return
    from exits.model.generator import build_generator
    from exits.train.shards import table_layout

    crops = math.ceil(table_layout(instances).num_rows / tcfg.num_workers)
    with torch.device("meta"):
        model = build_generator(model_cfg.generator, img_size=crop_size,
                                trainable_blocks=model_cfg.trainable_blocks, pretrained=False)  # fmt: skip
    limit, source = cache_limit(tcfg.cache_max_gb, 0, 1)
    check_token_cache(tcfg.cache_views, crops, model_crop_cache_bytes(model, points), limit, source)


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


__all__ = [
    "cache_limit",
    "cached_generator_loss",
    "check_run_token_cache",
    "check_token_cache",
    "crop_cache_bytes",
    "encode_views",
    "model_crop_cache_bytes",
    "shard_indices",
    "view_batches",
]
