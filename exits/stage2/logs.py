"""Stage 2's console lines: mmengine's training-iteration lines, condensed, nothing else.

mmengine logs its config dump, environment and hook tables at INFO as well; those stay in the
worker's log (Ray's session logs, copied to ``<run>/logs/ray/`` for local runs). Rank 0 hands
its runner's logger to :func:`forward_iteration_lines`, which sends one line such as
``2   iter 120/300  loss 1.204  1.41 s/iter  ETA 4m13s`` to the driver's console (through
:mod:`exits.progress`) at most every ``EXITS_PROGRESS_EVERY_S`` seconds, and always the last.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from exits.progress import emit, every_s, format_duration

_ITER = re.compile(r"Iter\(train\)\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")
_ETA = re.compile(r"\beta:\s*(?:(\d+) days?, )?(\d+):(\d{2}):(\d{2})")
_FIELD = r"(?<![\w/])%s:\s*([-+0-9.eE]+)"


def condense(message: str) -> str | None:
    """An mmengine ``Iter(train) [i/n] ... eta: h:mm:ss  time: t ... loss: l`` message ->
    ``2   iter i/n  loss l  t s/iter  ETA ...``; None for any other message."""
    m = _ITER.search(message)
    if m is None:
        return None
    parts = ["2 ", f"iter {m.group(1)}/{m.group(2)}"]
    loss = re.search(_FIELD % "loss", message)
    if loss:
        parts.append(f"loss {float(loss.group(1)):.3f}")
    step_time = re.search(_FIELD % "time", message)
    if step_time:
        parts.append(f"{float(step_time.group(1)):.2f} s/iter")
    eta = _ETA.search(message)
    if eta:
        days, h, mnt, s = (int(g or 0) for g in eta.groups())
        parts.append(f"ETA {format_duration(((days * 24 + h) * 60 + mnt) * 60 + s)}")
    return "  ".join(parts)


class IterationLines(logging.Handler):
    """A logging handler that forwards condensed iteration lines, throttled (see module doc)."""

    def __init__(self, interval_s: float | None = None, sink: Callable[[str], None] = emit,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        super().__init__(logging.INFO)
        self.interval_s = every_s() if interval_s is None else interval_s
        self.sink, self.clock = sink, clock
        self._last = float("-inf")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            line = condense(message)
            if line is None:
                return
            m = _ITER.search(message)
            last = m is not None and m.group(1) == m.group(2)
            now = self.clock()
            if last or now - self._last >= self.interval_s:
                self._last = now
                self.sink(line)
        except Exception:
            self.handleError(record)


def forward_iteration_lines(logger: logging.Logger) -> IterationLines:
    """Attach an :class:`IterationLines` handler to mmengine's runner logger (rank 0 only)."""
    handler = IterationLines()
    logger.addHandler(handler)
    return handler
