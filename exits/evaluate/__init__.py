"""Evaluation: mask AP (COCO / LVIS), retention, pseudo-label mIoU (``metrics``), the stage-1b
generator metric on held-out instances (``quality``) and stage-1 retrieval diagnostics
(``diagnostics``). Run ``python -m exits.evaluate --help`` for the command line."""

from exits.evaluate.metrics import (
    box_baseline_miou,
    box_masks_json,
    coco_from,
    detections_from,
    evaluate,
    is_lvis,
    load_json,
    lvis_ap,
    main,
    markdown_report,
    mask_ap,
    mmdet_metrics_table,
    parse_args,
    pseudo_label_miou,
    retention,
    write_metrics,
)
from exits.evaluate.miou import MiouSums, is_separated, num_components, rle_iou, size_bucket

__all__ = [
    "MiouSums",
    "box_baseline_miou",
    "box_masks_json",
    "coco_from",
    "detections_from",
    "evaluate",
    "is_lvis",
    "is_separated",
    "load_json",
    "lvis_ap",
    "main",
    "markdown_report",
    "mask_ap",
    "mmdet_metrics_table",
    "num_components",
    "parse_args",
    "pseudo_label_miou",
    "retention",
    "rle_iou",
    "size_bucket",
    "write_metrics",
]
