"""Stage 1c: bulk pseudo-labelling on Ray Data, exactly once per instance, resumable.

Modules: ``plan`` (input columns, schemas, shards, fingerprint), ``stages`` (the Ray Data
stages), ``commit`` (exactly-once shard commit, reading shards back, verification), ``run``
(``label_instances``, the driver) and ``export`` (streaming COCO json export).

Pipeline (streaming; the driver never holds images, crops or logits)::

    image rows (one per image, its instances as list columns; small metadata blocks)
      -> crop_images   CPU tasks: decode each image once, cut every instance crop at the fixed
                       1.3x enlargement of its box, resize to S x S      (images_per_block images)
      -> GeneratorStage actor pool (ActorPoolStrategy(size=num_actors), num_gpus=gpus_per_actor):
                       generator loaded once per actor, crops (B, 3, S, S) -> logits
                       (B, S/4, S/4), bf16 autocast on CUDA                (batch_size crops)
      -> paste_masks   CPU tasks: sigmoid, zero outside the box, paste back at full resolution,
                       threshold, quality score (``exits.inference.mask_score``: the expected
                       IoU of the box's probabilities with their own mask), COCO RLE
      -> driver        commits finished output shards (below)

Bad input never crashes the job: a missing/corrupt image, an image whose decoded size differs
from the annotation's, degenerate extreme points or a degenerate box become error rows
``(ann_id, image_id, stage="label", reason)`` that flow through the pipeline beside the crops.

Exactly once + resume: **deterministic output shards** (chosen over Ray Data's id-column
checkpointing, which in ray 2.60 is alpha, needs a read -> map-only -> write pipeline whose id
column survives every stage, and cannot follow our image -> instance row fan-out). Images are
sorted by ``image_id`` and cut into shards of ``shard_images`` images; the plan (shard count
plus a fingerprint of the inputs, generator and settings) is written to ``plan.json`` on the
first run and a re-run against a different plan fails loudly. The driver consumes the result
stream, keys rows by ``ann_id`` (so a retried Ray task cannot duplicate a row) and, as soon as a
shard holds every one of its instances, publishes ``errors/shard-00012.parquet`` and then
``masks/shard-00012.parquet`` (each an atomic single-object write; the masks file is the commit
marker). A re-run lists the committed shards and feeds only the other images into the pipeline.
The driver never holds the instance table: one pass part by part keeps each instance's ann_id
and shard and a digest of the inputs (``plan.scan_input``), a second builds the image-row blocks
of the shards to do and puts them into the object store one at a time (``plan.image_blocks``).
:func:`verify_outputs` then checks that every input ``ann_id`` appears exactly once in masks
plus errors, and ``manifest.json`` is written last.

Output layout under ``<output>/label/``::

    plan.json, masks/shard-NNNNN.parquet (MASK_SCHEMA), errors/shard-NNNNN.parquet
    (coco.ERROR_SCHEMA), errors/prepare.parquet (upstream errors carried along), manifest.json
"""

from exits.label.commit import (
    SHARD_FORMAT,
    OutputMismatch,
    ShardCommitter,
    committed_shards,
    read_errors,
    read_masks,
    shard_uri,
    verify_outputs,
)
from exits.label.export import export_coco
from exits.label.plan import (
    INPUT_COLUMNS,
    MASK_SCHEMA,
    PLAN,
    PREPARE_ERRORS,
    PSEUDO_JSON,
    RESULT_SCHEMA,
    STAGE,
    assign_shards,
    describe_checkpoint,
    fingerprint,
    image_blocks,
    image_rows,
    instance_parts,
    read_instances,
    scan_input,
)
from exits.label.run import InjectedFault, label_instances
from exits.label.stages import (
    GeneratorStage,
    MaskPredictor,
    build_dataset,
    crop_images,
    crop_task_memory,
    mask_from_logits,
    paste_masks,
)

__all__ = [
    "INPUT_COLUMNS",
    "MASK_SCHEMA",
    "PLAN",
    "PREPARE_ERRORS",
    "PSEUDO_JSON",
    "RESULT_SCHEMA",
    "SHARD_FORMAT",
    "STAGE",
    "GeneratorStage",
    "InjectedFault",
    "MaskPredictor",
    "OutputMismatch",
    "ShardCommitter",
    "assign_shards",
    "build_dataset",
    "committed_shards",
    "crop_images",
    "crop_task_memory",
    "describe_checkpoint",
    "export_coco",
    "fingerprint",
    "image_blocks",
    "image_rows",
    "instance_parts",
    "label_instances",
    "mask_from_logits",
    "paste_masks",
    "read_errors",
    "read_instances",
    "read_masks",
    "scan_input",
    "shard_uri",
    "verify_outputs",
]
