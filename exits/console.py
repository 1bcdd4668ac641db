"""What the console shows, and where everything else goes.

Quiet by default. The console (stdout, which is also what ``ray job submit`` tails) shows the
pipeline's own lines: stage starts and ends, progress lines with ETA (:mod:`exits.progress`),
warnings from ``exits``, and errors from anything. Everything else goes to files:

- the driver's log, ``<run>/logs/driver.log``: every logger at INFO (Ray core, Ray Data's
  execution plans and stats, token-auth notices, Python warnings);
- ``<run>/logs/driver-native.log``: what native code in the driver writes to stderr (Ray's C++
  core worker, e.g. ``core_worker.cc ... constructor arguments in the object store``);
- Ray workers' own output (Ray Train's ``Reporting training result ... TrainingReport``
  lines, the placement-group cleaner, mmdet's config dump): Ray's session logs,
  ``<session>/logs/worker-*.out|err``; a run that started its own local Ray copies those to
  ``<run>/logs/ray/`` at the end (on a cluster: ``ray logs`` or the dashboard).

``verbose=True`` (``--verbose``) restores Ray's console: worker output streamed to the
driver, Ray's and Ray Data's INFO lines and progress bars. Only documented switches are used:
``ray.init(log_to_driver=...)``, ``DataContext.enable_progress_bars`` and the standard
``logging`` configuration of the ``ray`` / ``ray.data`` loggers, and a redirect of the
driver's file descriptor 2 (Python's ``sys.stderr`` stays on the console). Ray itself is not
patched.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import exits

LOG_DIR = "logs"
DRIVER_LOG = "driver.log"
NATIVE_LOG = "driver-native.log"  # the driver's fd 2 (Ray's C++ logging) in quiet mode
RAY_LOGS = "ray"
FILE_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_RAY_LOGGERS = ("ray", "ray.data")  # Ray's loggers with their own console handlers


class _ConsoleFilter(logging.Filter):
    """Quiet console: ``exits`` at INFO and above, anything else only at ERROR and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.name.split(".")[0] == "exits" and record.levelno >= logging.INFO


class _ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS  message``; warnings and errors also name their level and logger."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s  %(message)s", datefmt="%H:%M:%S")
        self._loud = logging.Formatter(
            "%(asctime)s  %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        return (self._loud if record.levelno >= logging.WARNING else super()).format(record)


def setup_logging(verbose: bool = False, log_file: str | None = None) -> None:
    """Configure the driver's logging (call before ``ray.init``; imports ``ray.data``).

    Args:
        verbose: False: the quiet console above; True: every logger at INFO on the console.
        log_file: local path of the driver's log (every logger at INFO); None: no file.
    """
    import ray.data  # noqa: F401  (configures the ray.data logger, which we then adjust)

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_ConsoleFormatter())
    if not verbose:
        console.addFilter(_ConsoleFilter())
    root.addHandler(console)
    handlers: list[logging.Handler] = []
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
        root.addHandler(file_handler)
        handlers.append(file_handler)
    logging.captureWarnings(True)  # Python warnings -> the "py.warnings" logger (file only)
    for name in _RAY_LOGGERS:  # they do not propagate: give them our file, mute their console
        lg = logging.getLogger(name)
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not verbose:
                h.setLevel(logging.ERROR)
        for h in handlers:
            if h not in lg.handlers:
                lg.addHandler(h)


def ray_init(*, address: str | None = None, num_cpus: int | None = None,
             verbose: bool = False, **kwargs) -> str | None:  # fmt: skip
    """``ray.init`` for jobs: connect to ``address`` (or ``$RAY_ADDRESS``), else start a local
    Ray; quiet unless ``verbose``. Returns the session directory of a local Ray started here
    (for :func:`collect_ray_logs`), None when connected to a cluster."""
    import ray
    import ray.data

    kwargs = arrow_pool_everywhere(kwargs)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose, **kwargs)
        session_dir = None
    else:
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                       log_to_driver=verbose, **kwargs)  # fmt: skip
        session_dir = ctx.address_info.get("session_dir")
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    return session_dir


def arrow_pool_everywhere(init_kwargs: dict) -> dict:
    """``ray.init`` keyword arguments that give every Ray worker of the job the Arrow allocator
    this package chose at import (``exits.ARROW_POOL``): the variable in
    ``runtime_env["env_vars"]``. Unchanged when the user set ``$ARROW_DEFAULT_MEMORY_POOL``
    (the job's own runtime env already carries it, and Ray refuses the same key from both)."""
    if not exits.ARROW_POOL_SET_HERE:
        return init_kwargs
    runtime_env = dict(init_kwargs.get("runtime_env") or {})
    env_vars = {**(runtime_env.get("env_vars") or {}), exits.ARROW_POOL_ENV: exits.ARROW_POOL}
    return {**init_kwargs, "runtime_env": {**runtime_env, "env_vars": env_vars}}


def collect_ray_logs(session_dir: str | None, dest_dir: str) -> list[str]:
    """Copy a local Ray session's worker logs (``worker-*.out|err``) into ``dest_dir``.

    Returns the copied paths ([] without a session directory).
    """
    if not session_dir:
        return []
    os.makedirs(dest_dir, exist_ok=True)
    copied = []
    for path in sorted(glob.glob(os.path.join(session_dir, "logs", "worker-*"))):
        if path.endswith((".out", ".err")):
            dest = os.path.join(dest_dir, os.path.basename(path))
            shutil.copyfile(path, dest)
            copied.append(dest)
    return copied


@contextmanager
def native_stderr_to(log_file: str) -> Iterator[None]:
    """Send what native code writes to file descriptor 2 (Ray's C++ core worker, e.g.
    ``core_worker.cc ... has constructor arguments in the object store``) to ``log_file``,
    while Python's ``sys.stderr`` (tracebacks, warnings printed by Python) stays on the console.
    """
    sys.stderr.flush()
    console_fd = os.dup(2)
    saved = sys.stderr
    with open(log_file, "ab", buffering=0) as f:
        sys.stderr = os.fdopen(os.dup(console_fd), "w", buffering=1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(console_fd, 2)
            os.close(console_fd)
            sys.stderr.close()
            sys.stderr = saved


@contextmanager
def run_console(
    output: str, *, verbose: bool = False, num_cpus: int | None = None
) -> Iterator[None]:
    """Logging, Ray and the progress relay for one job writing the run ``output``.

    Logs go to ``<output>/logs/`` (for an ``s3://`` run: local files uploaded there at the
    end): ``driver.log``, ``driver-native.log`` (quiet mode) and ``ray/`` (the worker logs of a
    local Ray started here). Ray is shut down on exit.
    """
    import ray

    from exits import storage
    from exits.progress import ProgressRelay

    remote = storage.is_s3(output)
    log_dir = tempfile.mkdtemp(prefix="exits-logs-") if remote else os.path.join(output, LOG_DIR)
    setup_logging(verbose, os.path.join(log_dir, DRIVER_LOG))
    log = logging.getLogger("exits.console")
    where = storage.join(output, LOG_DIR)
    hint = "" if verbose else " (--verbose: on the console too)"
    log.info("run %s; logs in %s%s", output, where, hint)
    try:
        with contextlib.ExitStack() as stack:
            if not verbose:
                stack.enter_context(native_stderr_to(os.path.join(log_dir, NATIVE_LOG)))
            session_dir = ray_init(num_cpus=num_cpus, verbose=verbose)
            try:
                with ProgressRelay():
                    yield
            finally:
                collect_ray_logs(session_dir, os.path.join(log_dir, RAY_LOGS))
                ray.shutdown()
    finally:
        for h in logging.getLogger().handlers:
            h.flush()
        if remote:
            for path in glob.glob(os.path.join(log_dir, "**", "*"), recursive=True):
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        rel = os.path.relpath(path, log_dir)
                        storage.publish_bytes(storage.join(where, *rel.split(os.sep)), f.read())
