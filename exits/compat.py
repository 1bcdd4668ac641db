"""Compatibility shims for third-party packages, each scoped and explained.

* ``lvis`` 0.5.3 (the newest on PyPI; mmdet's LVISV1Dataset/LVISMetric and
  :func:`exits.evaluate.lvis_ap` use it) calls ``np.float`` in ``LVISEval.accumulate``, an
  alias numpy removed in 1.24. The fix exists only in the lvis-api git repository, which a
  package-registry-only machine cannot install from, so the alias is restored (as the builtin
  ``float``, which is what it always was) before ``lvis`` runs.
"""

from __future__ import annotations

import numpy as np


def lvis_numpy_compat() -> None:
    """Restore ``np.float`` (= builtin ``float``) for ``lvis`` 0.5.3; no-op when present."""
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
