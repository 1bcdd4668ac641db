"""Progress lines for everything a person waits on, and the relay that brings them to the console.

A line is short and always reads the same way: stage, position, the stage's own figures, rate,
ETA, e.g. ``1b  epoch 7/30  step 420/1800  loss 0.214  3.1 steps/s  ETA 7m40s``. A
:class:`Progress` decides when a line is due (every ``EXITS_PROGRESS_EVERY_S`` seconds, default
10, and at the end) and formats it; it keeps no history.

Lines made inside Ray workers (rank 0 of a Ray Train run) reach the driver through
:class:`ProgressRelay`: a named zero-CPU actor the driver creates and polls, so the console
shows them without streaming every worker's stdout (see :mod:`exits.console`). Without a relay
(a test calling a loop directly, a bench) :func:`emit` prints to the process's stdout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("exits.progress")

RELAY_NAME = "exits-progress-relay"
EVERY_S_ENV = "EXITS_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 10.0


def every_s() -> float:
    """Seconds between progress lines (``$EXITS_PROGRESS_EVERY_S``, default 10)."""
    return float(os.environ.get(EVERY_S_ENV, DEFAULT_EVERY_S))


def format_duration(seconds: float) -> str:
    """45s, 7m40s, 2h05m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


class Progress:
    """Rate and ETA of one stage; ``update`` returns a line when one is due, else None.

    Args:
        stage: short stage tag printed first ("1a", "1b", "1c", "2").
        total: units of work in the whole stage (steps, rows).
        unit: what one unit is called in the position field ("step", "rows").
        rate_unit: the rate's unit ("steps/s", "crops/s").
        start: units already done when timing starts (a resumed run).
        interval_s: seconds between lines (default: :func:`every_s`).
        clock: time source (tests).
    """

    def __init__(self, stage: str, total: int, *, unit: str = "step", rate_unit: str = "steps/s",
                 start: int = 0, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.stage, self.total, self.unit, self.rate_unit = stage, int(total), unit, rate_unit
        self.interval_s = every_s() if interval_s is None else interval_s
        self.clock = clock
        self.t0 = self.t_last = clock()
        self.start = self.done = int(start)

    def rate(self) -> float:
        """Units per second since timing started (0 before the first unit)."""
        dt = self.clock() - self.t0
        return (self.done - self.start) / dt if dt > 0 else 0.0

    def eta_s(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else None

    def line(self, lead: dict | None = None, tail: dict | None = None) -> str:
        """``<stage>  <lead k v>  <unit> done/total  <tail k v>  <rate>  ETA <t>``."""
        parts = [self.stage]
        parts += [f"{k} {_fmt(v)}" for k, v in (lead or {}).items()]
        parts.append(f"{self.unit} {self.done}/{self.total}")
        parts += [f"{k} {_fmt(v)}" for k, v in (tail or {}).items()]
        parts.append(f"{self.rate():.2f} {self.rate_unit}")
        eta = self.eta_s()
        parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA ?")
        return "  ".join(parts)

    def update(self, done: int, lead: dict | None = None, tail: dict | None = None,
               force: bool = False) -> str | None:  # fmt: skip
        """Record ``done`` units; a line if ``interval_s`` passed since the last one (or forced)."""
        self.done = int(done)
        now = self.clock()
        if not force and now - self.t_last < self.interval_s:
            return None
        self.t_last = now
        return self.line(lead, tail)

    def summary(self, tail: dict | None = None) -> str:
        """``<stage>  done  <unit> n/total  <tail>  <rate>  in <elapsed>``."""
        parts = [self.stage, "done", f"{self.unit} {self.done}/{self.total}"]
        parts += [f"{k} {_fmt(v)}" for k, v in (tail or {}).items()]
        parts.append(f"{self.rate():.2f} {self.rate_unit}")
        parts.append(f"in {format_duration(self.clock() - self.t0)}")
        return "  ".join(parts)


# ------------------------------------------------------------------------------------ relay
class _Board:
    """The relay's actor: lines in, lines out."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


_handle_cache: dict[str, object] = {}


def _board():
    """The driver's relay actor (handle kept once found); None when there is none (or no Ray:
    ``exits.train.local`` on a machine without it)."""
    try:
        import ray
    except ImportError:
        return None

    if not ray.is_initialized():
        return None
    if "board" not in _handle_cache:  # only found handles are kept: a relay may start later
        try:
            _handle_cache["board"] = ray.get_actor(RELAY_NAME)
        except ValueError:
            return None
    return _handle_cache["board"]


def emit(line: str) -> None:
    """Send a progress line to the driver's console (from any Ray process)."""
    board = _board()
    if board is None:
        print(line, flush=True)
    else:
        board.put.remote(line)


class ProgressRelay:
    """Driver side: creates the named board and logs what workers put on it (``exits.progress``).

    Use as a context manager around the stages; lines arrive within ``poll_s`` seconds.
    """

    def __init__(self, poll_s: float = 1.0) -> None:
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._board = None

    def _drain(self) -> None:
        import ray

        for line in ray.get(self._board.take.remote(), timeout=60):
            log.info(line)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._drain()
            except Exception:  # a slow or lost poll only delays lines; never fail the run
                log.debug("progress relay poll failed", exc_info=True)

    def __enter__(self) -> ProgressRelay:
        import ray

        board_cls = ray.remote(num_cpus=0)(_Board)
        self._board = board_cls.options(name=RELAY_NAME, get_if_exists=True).remote()
        self._thread = threading.Thread(target=self._run, name="exits-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._drain()
            ray.kill(self._board)
        except Exception:
            log.debug("progress relay shutdown failed", exc_info=True)
        _handle_cache.clear()
