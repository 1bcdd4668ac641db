"""Issue 26 item 1 (round 2), without Ray: an output directory has one owner at a time. Two jobs
started on one --output a few seconds apart silently lost 264 of 800 annotations; now the second
is refused with a message naming the first while it is alive, takes over once it is dead or its
lease expired (or with --take-over), and the holder notices a take-over."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest
from hostile_inputs import hold_in_subprocess

from exits.lease import LeaseHeld, LeaseLost, OutputLease, lease_alive, read_lease


def test_one_owner_refuses_a_second_and_names_it(tmp_path):
    out = str(tmp_path / "run")
    proc = hold_in_subprocess(out)
    try:
        held = read_lease(out)
        assert held["pid"] == proc.pid and held["host"] == socket.gethostname()
        assert {"owner", "started", "heartbeat", "ttl_s", "command"} <= set(held)
        with pytest.raises(
            LeaseHeld, match=rf"in use by another run .* \(pid {proc.pid}\).*--take-over"
        ):
            OutputLease(out).acquire()
        assert sorted(os.listdir(out)) == ["lease.json", "lease.lock"]  # nothing else written
        time.sleep(0.5)
        assert read_lease(out)["heartbeat"] > held["heartbeat"]  # the holder's heartbeat runs
    finally:
        proc.kill()
        proc.wait()
    # killed (-9): its lease is left behind, but its pid is gone on this host: taken at once
    assert read_lease(out)["pid"] == proc.pid
    with OutputLease(out) as mine:
        assert read_lease(out)["owner"] == mine.owner
    assert read_lease(out) is None  # released at the end


def test_expired_lease_of_another_host_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = {"owner": "x" * 32, "host": "elsewhere", "pid": 1, "started": "then",
             "heartbeat": time.time() - 30, "ttl_s": 120}  # fmt: skip
    (out / "lease.json").write_text(json.dumps(other))
    assert lease_alive(other)  # heartbeat 30 s old, ttl 120 s
    with pytest.raises(LeaseHeld, match="on host elsewhere"):
        OutputLease(str(out)).acquire()
    other["heartbeat"] = time.time() - 121
    assert not lease_alive(other)
    (out / "lease.json").write_text(json.dumps(other))
    with OutputLease(str(out)):
        assert read_lease(str(out))["host"] == socket.gethostname()


def test_take_over_stops_the_holder(tmp_path):
    """--take-over on a live lease: the new run proceeds; the old one notices at its next
    heartbeat (on_lost; by default it interrupts its main thread) and fails on exit."""
    out = str(tmp_path / "run")
    lost = []
    first = OutputLease(out, heartbeat_s=0.05, on_lost=lost.append).acquire()
    second = OutputLease(out, take_over=True).acquire()
    for _ in range(100):
        if lost:
            break
        time.sleep(0.05)
    assert lost and lost[0]["owner"] == second.owner
    with pytest.raises(LeaseLost, match="taken over"):
        first.__exit__(None, None, None)
    assert read_lease(out)["owner"] == second.owner  # the loser does not remove it
    second.release()
    assert read_lease(out) is None


def test_leftover_temp_files_removed_on_taking_the_lease(tmp_path):
    """Item 10: kill -9 during export left pseudo_coco.json.tmp-* that reruns never removed."""
    out = tmp_path / "run"
    (out / "label").mkdir(parents=True)
    (out / "label" / "pseudo_coco.json.tmp-0a1b2c3d").write_bytes(b"")
    (out / "label" / "keep.tmp-notmine.json").write_bytes(b"{}")
    with OutputLease(str(out)):
        assert sorted(os.listdir(out / "label")) == ["keep.tmp-notmine.json"]
    # export_coco cleans its own target too (for callers without a lease)
    from exits import storage

    for name in ("pseudo_coco.json.tmp-0a1b2c3d", "other.json.tmp-0a1b2c3d"):
        (out / "label" / name).write_bytes(b"")
    removed = storage.remove_stale_temps(str(out / "label" / "pseudo_coco.json"))
    assert [os.path.basename(p) for p in removed] == ["pseudo_coco.json.tmp-0a1b2c3d"]


def test_s3_lease_write_then_read_back(s3_bucket, monkeypatch):
    """s3 has no lock and pyarrow no conditional put: the lease is written, then read back
    after the settle time; whoever is read back owns it."""
    out = f"{s3_bucket}/run"
    with OutputLease(out, settle_s=0.1) as first:
        assert read_lease(out)["owner"] == first.owner
        with pytest.raises(LeaseHeld, match="in use by another run"):
            OutputLease(out, settle_s=0.1).acquire()
    assert read_lease(out) is None
    # a rival that writes its lease during this run's settle time wins; this run refuses
    real_sleep = time.sleep

    def rival_writes(seconds):
        rival = OutputLease(out)
        rival.info = {"owner": rival.owner, "host": "rival-host", "pid": 1, "ttl_s": 120}
        rival._write()
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", rival_writes)
    with pytest.raises(LeaseHeld, match="on host rival-host"):
        OutputLease(out, settle_s=0.1).acquire()


def test_pipeline_job_refused_before_ray_or_any_write(tmp_path, monkeypatch, load_script):
    """The lease is taken before Ray starts and before config.json or the logs are written."""
    job = load_script("jobs/pipeline.py")
    out = str(tmp_path / "run")
    proc = hold_in_subprocess(out)
    try:
        monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` would fail the test
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
            job.main(["--output", out, "--stages", "prepare"])
        assert sorted(os.listdir(out)) == ["lease.json", "lease.lock"]
    finally:
        proc.kill()
        proc.wait()


def test_pipeline_label_counts_against_prepare_not_the_table_on_disk(tmp_path):
    """Item 1: the end-of-run check compared against a table another run had shrunk (800
    reported, 536 rows left: green). The pipeline's label stage now checks its outputs against
    the counts prepare recorded when it wrote the table."""
    from exits import storage
    from exits.label.commit import OutputMismatch
    from exits.pipeline.label import _check_counts

    run = str(tmp_path / "run")
    storage.write_json(storage.join(run, "prepare", "manifest.json"),
                       {"counts": {"instances": 800, "errors": 5}})  # fmt: skip
    _check_counts(run, {"masks": 790, "errors": 10, "prepare_errors": 5})
    with pytest.raises(OutputMismatch, match="prepare counted 800 instances"):
        _check_counts(run, {"masks": 530, "errors": 6, "prepare_errors": 5})
