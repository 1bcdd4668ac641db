"""EXITS: extreme-point supervised instance segmentation on Ray."""

import os as _os

__version__ = "0.1.0"

# Arrow's allocator: "system" (glibc), not the pyarrow wheel's default mimalloc, whose
# per-thread caches kept freed memory: ~1 KB per instance read (bench/scale.py --stages all at
# 5 k vs 50 k: the label actor's private memory +63 %, the eval's mIoU pass +34 MB vs +12 MB;
# docs/benchmarks.md). Arrow's C++ code reads the variable once, when its default pool is first
# used, so it is set here, before anything imports pyarrow (``pa.set_memory_pool`` later would
# only change what Python-level calls use, not dataset scans). A value the user set wins.
# exits.console.ray_init passes it on to every Ray worker of a job.
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
ARROW_POOL = "system"
ARROW_POOL_SET_HERE = ARROW_POOL_ENV not in _os.environ
if ARROW_POOL_SET_HERE:
    _os.environ[ARROW_POOL_ENV] = ARROW_POOL
