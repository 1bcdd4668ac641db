"""One owner per output directory: a lease file ``<output>/lease.json`` taken before any write.

A run writes ``{"owner", "host", "pid", "started", "heartbeat", "ttl_s", "command"}`` and a
background thread refreshes ``heartbeat`` every :data:`HEARTBEAT_S` seconds. Another run on the
same output is refused with a message naming the holder while the lease is alive (heartbeat
younger than :data:`TTL_S`, and on the same host: its pid still running); it takes the lease
over once it has expired, or at once with ``take_over=True`` (``--take-over`` in the jobs).
The holder's heartbeat notices a take-over and stops the run (``on_lost``); leaving the block
releases the lease.

Atomicity: on local disk the read-decide-write runs under ``fcntl.flock`` of
``<output>/lease.lock``. On s3 (no locks, and pyarrow has no conditional put) the lease is
written, then read back after :data:`SETTLE_S`; the run whose lease is read back owns it, so two
runs that start within the settle time cannot both proceed, and a holder whose lease was
overwritten later notices it at its next heartbeat. Clocks of the hosts must agree to well
within :data:`TTL_S` (NTP).
"""

from __future__ import annotations

import _thread
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from exits import storage

log = logging.getLogger("exits.lease")

LEASE_NAME = "lease.json"
LOCK_NAME = "lease.lock"  # local disk only: the flock guarding read-decide-write
TTL_S = 120.0  # a lease whose heartbeat is older than this has expired
HEARTBEAT_S = 15.0  # how often the holder refreshes it
SETTLE_S = 1.0  # s3: wait before reading the lease back


class LeaseHeld(RuntimeError):
    """The output directory is owned by another live run."""


class LeaseLost(RuntimeError):
    """Another run took this run's lease over while it was running."""


def lease_uri(output: str) -> str:
    return storage.join(output, LEASE_NAME)


def read_lease(output: str) -> dict[str, Any] | None:
    """The lease at ``output`` (None when there is none or it is unreadable)."""
    try:
        obj = json.loads(storage.read_bytes(lease_uri(output)))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _pid_running(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists (another user) or unknown: assume running
    return True


def lease_alive(info: dict[str, Any], now: float | None = None) -> bool:
    """Whether a lease holds: heartbeat younger than its ttl, and, on this host, its pid runs."""
    now = time.time() if now is None else now
    try:
        fresh = now - float(info.get("heartbeat", 0)) < float(info.get("ttl_s", TTL_S))
    except (TypeError, ValueError):
        return False
    if info.get("host") == socket.gethostname() and not _pid_running(info.get("pid")):
        return False  # a dead process on this host: no need to wait for the ttl
    return fresh


def describe(info: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    try:
        age = f"{now - float(info.get('heartbeat', 0)):.0f} s ago"
    except (TypeError, ValueError):
        age = "unknown"
    return (
        f"run {info.get('owner')!s:.12} on host {info.get('host')!s:.64} (pid {info.get('pid')}), "
        f"started {info.get('started')!s:.32}, last heartbeat {age}"
    )


class OutputLease:
    """Hold the lease of ``output`` for the duration of a ``with`` block (see the module doc).

    Args:
        output: run directory (local path or ``s3://``).
        take_over: take the lease even from a live holder (that run stops at its heartbeat).
        ttl_s, heartbeat_s, settle_s: see the module constants.
        on_lost: called (in the heartbeat thread) with the new holder's lease when this run's
            lease was taken over; default: log and interrupt the main thread.
    """

    def __init__(self, output: str, *, take_over: bool = False, ttl_s: float = TTL_S,
                 heartbeat_s: float = HEARTBEAT_S, settle_s: float = SETTLE_S,
                 on_lost: Callable[[dict], None] | None = None) -> None:  # fmt: skip
        self.output = output
        self.take_over = take_over
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self.on_lost = on_lost or _interrupt_main
        self.owner = uuid.uuid4().hex
        self.info: dict[str, Any] = {}
        self.lost: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.local = not storage.is_s3(output) and "://" not in output

    # ---------------------------------------------------------------- locking
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.local:
            yield
            return
        import fcntl

        os.makedirs(self.output, exist_ok=True)
        with open(os.path.join(self.output, LOCK_NAME), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write(self) -> None:
        self.info["heartbeat"] = time.time()
        storage.publish_bytes(lease_uri(self.output), json.dumps(self.info).encode())

    # ---------------------------------------------------------------- public
    def acquire(self) -> OutputLease:
        """Take the lease or raise :class:`LeaseHeld` naming the live holder."""
        now = time.time()
        self.info = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "heartbeat": now, "ttl_s": self.ttl_s,
                     "command": " ".join(sys.argv)[:500]}  # fmt: skip
        with self._locked():
            held = read_lease(self.output)
            if held and held.get("owner") != self.owner and lease_alive(held):
                if not self.take_over:
                    raise LeaseHeld(self._refusal(held))
                log.warning("output %s: taking the lease over from %s", self.output, describe(held))
            elif held:
                log.info("output %s: the previous lease (%s) has expired; taking it over",
                         self.output, describe(held))  # fmt: skip
            self._write()
            if self.local:
                storage.remove_stale_temps(self.output)  # no one else writes here now
        if not self.local:
            time.sleep(self.settle_s)
            back = read_lease(self.output)
            if not back or back.get("owner") != self.owner:
                raise LeaseHeld(self._refusal(back or {}))
        self._thread = threading.Thread(target=self._beat, name="exits-lease", daemon=True)
        self._thread.start()
        return self

    def _refusal(self, held: dict) -> str:
        return (
            f"output {self.output} is in use by another {describe(held)}: one output directory "
            f"has one owner at a time. Wait for that run to finish, use another --output, or, "
            f"if it is dead, pass --take-over (its lease expires {self.ttl_s:.0f} s after its "
            f"last heartbeat)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._locked():
                    held = read_lease(self.output)
                    if held is not None and held.get("owner") != self.owner:
                        self.lost = held
                    else:
                        self._write()
            except Exception as e:  # noqa: BLE001 - a failed refresh is retried next beat
                log.warning("output %s: lease heartbeat failed: %s", self.output, e)
                continue
            if self.lost is not None:
                log.error("output %s: the lease was taken over by %s; stopping this run",
                          self.output, describe(self.lost))  # fmt: skip
                self.on_lost(self.lost)
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._locked():
            held = read_lease(self.output)
            if held is not None and held.get("owner") == self.owner:
                storage.remove(lease_uri(self.output))

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        if self.lost is not None and exc_type in (None, KeyboardInterrupt):
            raise LeaseLost(
                f"output {self.output}: the lease was taken over by {describe(self.lost)} "
                "while this run was writing; its results there are not this run's"
            )


def _interrupt_main(_: dict) -> None:
    _thread.interrupt_main()
