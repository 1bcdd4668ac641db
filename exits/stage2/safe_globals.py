"""``torch.load(weights_only=True)`` of mmengine checkpoints: the allow-list of non-tensor types.

``torch.load`` defaults to ``weights_only=True``: :func:`register_mmengine_safe_globals`
allow-lists exactly the non-tensor types an mmengine checkpoint pickles.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch

# numpy dtypes whose arrays/scalars mmengine may pickle (message hub, runtime info)
NUMPY_DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_)


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` while unpickling: HistoryBuffer's public methods only.

    ``HistoryBuffer.__getstate__`` pickles its statistics methods (``HistoryBuffer.min`` …),
    which protocol 2 writes as ``getattr(HistoryBuffer, "min")``. Allow-listing the real
    ``getattr`` would allow any attribute access on any allowed object; this allows exactly
    what mmengine writes.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    if (
        obj is HistoryBuffer
        and not name.startswith("_")
        and callable(getattr(HistoryBuffer, name, None))
    ):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed in a checkpoint")


def mmengine_safe_globals() -> list[Any]:
    """Non-tensor globals pickled in an mmengine checkpoint, for ``weights_only=True``.

    Found by listing the GLOBAL opcodes of Mask R-CNN / SOLOv2 / Mask2Former checkpoints
    (mmengine 0.10.7, numpy 2.x): the message hub keeps ``HistoryBuffer`` objects (float64
    arrays + their statistics methods via ``getattr``), runtime info holds numpy scalars.
    numpy 1.x wrote ``numpy.core.multiarray``; both spellings are registered.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    dtype_classes = [type(np.dtype(t)) for t in NUMPY_DTYPES]  # e.g. numpy.dtypes.Float64DType
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        *dtype_classes,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (_history_buffer_getattr, "__builtin__.getattr"),  # protocol-2 name of builtins.getattr
        (_history_buffer_getattr, "builtins.getattr"),
    ]


def register_mmengine_safe_globals() -> None:
    """Allow-list :func:`mmengine_safe_globals` for ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals(mmengine_safe_globals())
