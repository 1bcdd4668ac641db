"""Stage 2: mmdetection instance segmentation trained on pseudo masks, under Ray Train.

* :mod:`exits.stage2.configs` — mmdet 3.3 config builders (Mask R-CNN, SOLOv2, Mask2Former).
* :mod:`exits.stage2.ray_train` — ``TorchTrainer`` wrapper around an mmengine ``Runner``.
"""

from exits.stage2.configs import available_models, build_stage2_config, load_model_spec
from exits.stage2.ray_train import (
    RayTrainReportHook,
    register_mmengine_safe_globals,
    train_stage2,
)

__all__ = [
    "RayTrainReportHook",
    "available_models",
    "build_stage2_config",
    "load_model_spec",
    "register_mmengine_safe_globals",
    "train_stage2",
]
