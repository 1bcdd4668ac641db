"""The EXITS pipeline: prepare -> 1a warm-up -> 1b generator -> 1c label -> 2 stage2 -> eval.

Each stage reads the previous stages' artifacts from the run directory (local path or
``s3://``), writes its own under ``<run>/<stage>/`` and publishes ``manifest.json`` last. A stage
whose manifest carries the same fingerprint (its inputs' fingerprints + its config) is
skipped, so re-submitting a killed job continues where it stopped (stage 1b also resumes from
its last Ray Train checkpoint, stage 1c from its last committed shard).

Modules: ``runner`` (fingerprints, skip/run, the summary line), ``common`` (run layout), and
one adapter per stage: ``prepare``, ``train`` (1a, 1b), ``label`` (1c), ``stage2``, ``eval``.
``jobs/pipeline.py`` is the command line.
"""

from exits.pipeline.common import STAGES, data_paths, stage_uri
from exits.pipeline.eval import run_eval
from exits.pipeline.label import PSEUDO_JSON, run_label
from exits.pipeline.prepare import run_prepare
from exits.pipeline.runner import (
    STAGE_FUNCS,
    abspath_if_local,
    run_pipeline,
    stage_fingerprints,
    summary_line,
)
from exits.pipeline.stage2 import run_stage2
from exits.pipeline.train import run_generator, run_warmup

__all__ = [
    "PSEUDO_JSON",
    "STAGES",
    "STAGE_FUNCS",
    "abspath_if_local",
    "data_paths",
    "run_eval",
    "run_generator",
    "run_label",
    "run_pipeline",
    "run_prepare",
    "run_stage2",
    "run_warmup",
    "stage_fingerprints",
    "stage_uri",
    "summary_line",
]
