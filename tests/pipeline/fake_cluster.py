"""A local autoscaling Ray cluster built from a cluster-launcher YAML (test helper).

Ray's fake multi-node provider (``ray.autoscaler._private.fake_multi_node``) starts worker
"nodes" as extra raylets on this machine, launched and terminated by the real autoscaler
(v1 monitor) from the config's ``available_node_types``; GPUs are logical resources.
``ray.cluster_utils.AutoscalingCluster`` does not work from the Ray 2.60 wheel (it reads a
missing ``fake_multi_node/example.yaml``) and runs ``ray stop --force``, which would kill
every Ray on a shared machine, so this helper writes the config itself, starts the head on
free ports under its own ``--temp-dir`` and stops only the processes of that directory.

The fake provider starts its nodes against ``provider.gcs_address`` (default: this
machine's IP, port 6379), so the config carries the head's GCS address.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)

psutil = __import__("psutil")

FAKE_HEAD_TYPE = "ray.head.default"  # the head's node type name in the fake provider


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scale_resources(resources: Mapping[str, float], max_cpus: float) -> dict[str, float]:
    """Same resource names; CPUs capped at ``max_cpus`` so a node fits on one machine; GPUs
    and custom resources kept (they are logical here)."""
    out = {k: v for k, v in resources.items()}
    if "CPU" in out:
        out["CPU"] = min(out["CPU"], max_cpus)
    return out


def fake_cluster_config(
    launcher: Mapping[str, Any],
    *,
    gcs_address: str,
    max_cpus: float = 2,
    max_workers_per_type: int = 2,
    idle_timeout_minutes: float = 0.2,
) -> dict[str, Any]:
    """An autoscaler config for the fake provider with ``launcher``'s worker node types
    (resources scaled by :func:`scale_resources`, ``min_workers: 0``, at most
    ``max_workers_per_type`` each) and its head's resources."""
    head = launcher["head_node_type"]
    types: dict[str, Any] = {}
    for name, spec in launcher["available_node_types"].items():
        res = scale_resources(spec.get("resources", {}), max_cpus)
        if name == head:
            types[FAKE_HEAD_TYPE] = {"resources": res, "node_config": {}, "max_workers": 0}
        else:
            types[name] = {
                "resources": res,
                "node_config": {},
                "min_workers": 0,
                "max_workers": min(int(spec.get("max_workers", 1)), max_workers_per_type),
            }
    return {
        "cluster_name": "exits-fake",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": float(launcher.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "docker": {},
        "auth": {},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeCluster:
    """Start / inspect / stop a fake autoscaling cluster under ``temp_dir``.

    Args:
        config: from :func:`fake_cluster_config` (its ``provider.gcs_address`` port is used).
        temp_dir: this cluster's Ray temp dir (short: Unix socket paths are limited to 107
            characters); every process of the cluster has it on its command line.
    """

    def __init__(self, config: Mapping[str, Any], temp_dir: str) -> None:
        self.config = copy.deepcopy(dict(config))
        self.temp_dir = temp_dir
        self.address = self.config["provider"]["gcs_address"]
        self.config_path = os.path.join(temp_dir, "autoscaling.json")

    def start(self, timeout_s: float = 180, attempts: int = 3) -> None:
        """``ray start --head`` with the autoscaler; on failure, stops what it started and
        retries (on a heavily loaded machine Ray's own start-up waits can time out, e.g. the
        raylet waiting for its agent's port file)."""
        for attempt in range(1, attempts + 1):
            try:
                self._start(timeout_s)
                return
            except subprocess.SubprocessError as e:
                self.stop()
                out = getattr(e, "stdout", b"") or b""
                err = getattr(e, "stderr", b"") or b""
                detail = (out + err).decode(errors="replace")[-3000:]
                if attempt == attempts:
                    raise RuntimeError(f"ray start failed {attempts} times:\n{detail}") from e
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            except BaseException:
                self.stop()
                raise

    def _start(self, timeout_s: float) -> None:
        os.makedirs(self.temp_dir, exist_ok=True)
        with open(self.config_path, "w") as f:
            json.dump(self.config, f)
        host, port = self.address.rsplit(":", 1)
        head = self.config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
        custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [
            ray_bin, "start", "--head", f"--port={port}", f"--node-ip-address={host}",
            f"--temp-dir={self.temp_dir}", f"--autoscaling-config={self.config_path}",
            f"--num-cpus={head.get('CPU', 0):g}", f"--num-gpus={head.get('GPU', 0):g}",
            "--include-dashboard=false", f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0",
            "--max-worker-port=0", "--disable-usage-stats",
        ]  # fmt: skip
        if custom:
            cmd.append(f"--resources={json.dumps(custom)}")
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}  # fmt: skip
        subprocess.run(cmd, env=env, check=True, timeout=timeout_s, capture_output=True)

    # ---------------------------------------------------------------- inspection
    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (its temp dir is on each command line)."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if p.pid != os.getpid() and any(self.temp_dir in a for a in cmd):
                out.append(p)
        return out

    def logs_dir(self) -> str:
        return os.path.join(self.temp_dir, "session_latest", "logs")

    def monitor_log(self) -> str:
        """The autoscaler's log (launches, terminations, infeasible-request errors)."""
        text = ""
        for name in ("monitor.log", "monitor.out", "monitor.err"):
            path = os.path.join(self.logs_dir(), name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f.read()
        return text

    def raylet_pids(self, node_type: str | None = None) -> dict[str, int]:
        """{node id: raylet pid} of the fake worker nodes (of ``node_type``); the provider
        starts each raylet with RAY_OVERRIDE_NODE_ID_FOR_TESTING and RAY_NODE_TYPE_NAME."""
        out = {}
        for p in self.processes():
            try:
                cmd = p.cmdline()
                if not cmd or not cmd[0].endswith("raylet"):
                    continue
                env = p.environ()
            except psutil.Error:
                continue
            node_id = env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
            if node_id and node_type in (None, env.get("RAY_NODE_TYPE_NAME")):
                out[node_id] = p.pid
        return out

    # ---------------------------------------------------------------- stop
    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM then SIGKILL every process of this cluster only (never ``ray stop``)."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout_s / 2)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=timeout_s / 2)
        deadline = time.time() + timeout_s
        while self.processes() and time.time() < deadline:  # children started meanwhile
            for p in self.processes():
                try:
                    p.kill()
                except psutil.Error:
                    pass
            time.sleep(0.5)

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
