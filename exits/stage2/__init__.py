"""Stage 2: mmdetection instance segmentation trained on pseudo masks, under Ray Train.

* :mod:`exits.stage2.configs` — mmdet 3.3 config builders (Mask R-CNN, SOLOv2, Mask2Former).
* :mod:`exits.stage2.driver` — ``train_stage2``: ``TorchTrainer`` around an mmengine ``Runner``.
* :mod:`exits.stage2.worker` — ``train_loop_per_worker`` (device, inputs, resume, ``Runner``).
* :mod:`exits.stage2.report_hook` — ``RayTrainReportHook``: metrics and checkpoints to Ray.
* :mod:`exits.stage2.safe_globals` — the ``torch.load(weights_only=True)`` allow-list.
"""

from exits.stage2.configs import available_models, build_stage2_config, load_model_spec
from exits.stage2.driver import train_stage2
from exits.stage2.report_hook import RayTrainReportHook
from exits.stage2.safe_globals import register_mmengine_safe_globals

__all__ = [
    "RayTrainReportHook",
    "available_models",
    "build_stage2_config",
    "load_model_spec",
    "register_mmengine_safe_globals",
    "train_stage2",
]
