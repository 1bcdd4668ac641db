"""The pipeline under Ray's autoscaler, on one machine: cluster/aws.yaml's node types as a fake
multi-node cluster (tests/pipeline/fake_cluster.py).

Node types are read from cluster/aws.yaml with the same resource names (GPUs as logical
resources, CPUs capped at 2, ``min_workers: 0``, at most 2 nodes per type, 12 s idle
timeout). The pipeline is submitted like ``ray job submit`` does it (a driver process with
``RAY_ADDRESS``), with the cloud profile's (configs/datasets/coco.yaml) per-worker requests on
the ``--quick`` workload, torch on CPU (``logical_gpus``). Asserted from the autoscaler's own
event log and status: which node types it launched for which stage (stage 2 included: its
worker asks for a logical GPU and ``train_node``, so it lands on ``gpu_train``), that no
request was infeasible, that every stage finished and that idle nodes were removed; then a
labelling node is killed mid-run and the job must still label every instance exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from exits import manifest, storage
from exits.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from fake_cluster import FakeCluster, fake_cluster_config, free_port, psutil  # noqa: E402

IDLE_TIMEOUT_MIN = 0.2  # 12 s
# the cloud profile's per-worker requests, applied to the --quick workload
CLOUD_KEYS = {
    "warmup": ("use_gpu", "node_resource"),
    "generator": ("use_gpu", "node_resource"),
    "label": ("use_gpu", "gpus_per_actor", "cpus_per_actor", "decode_resource"),
    # not cpus_per_worker (8 on the cloud: more than a fake node's 2 CPUs): --quick's 1
    "stage2": ("use_gpu", "node_resource"),
}


def cloud_overrides(profile: str = "coco") -> list[str]:
    cloud = load_config(profile)
    out = [
        f"{part}.{key}={json.dumps(getattr(getattr(cloud, part), key))}"
        for part, keys in CLOUD_KEYS.items()
        for key in keys
    ]
    out += [f"{part}.logical_gpus=true" for part in CLOUD_KEYS]  # the model runs on CPU here
    return out


class AutoscalerWatch:
    """Polls the autoscaler's status (GCS key ``__autoscaling_status``) once a second and
    reads its event log (``Adding 1 node(s) of type gpu_label.`` ...)."""

    def __init__(self, cluster: FakeCluster) -> None:
        from ray._raylet import GcsClient

        self.cluster = cluster
        self.gcs = GcsClient(address=cluster.address)
        self.snapshots: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def status(self) -> dict:
        raw = self.gcs.internal_kv_get(b"__autoscaling_status", None)
        return json.loads(raw) if raw else {}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.snapshots.append((time.time(), self.status()))
            except Exception:  # GCS busy: next round
                pass
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def workers(self, status: dict | None = None) -> dict[str, int]:
        """Active worker nodes by type (head excluded)."""
        active = ((status or self.status()).get("autoscaler_report") or {}).get("active_nodes", {})
        return {k: v for k, v in active.items() if k != "ray.head.default"}

    def events(self, since: float = 0.0) -> list[tuple[float, str]]:
        path = os.path.join(self.cluster.logs_dir(), "events", "event_AUTOSCALER.log")
        out = []
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                e = json.loads(line)
                if float(e["timestamp"]) >= since - 1:
                    out.append((float(e["timestamp"]), e["message"]))
        return out

    def nodes_seen(self, node_type: str, since: float = 0.0) -> set[str]:
        """Node ids of ``node_type`` the status listed at or after ``since``."""
        seen = set()
        for t, status in list(self.snapshots):
            if t < since:
                continue
            for part in ("autoscaler_report", "load_metrics_report"):
                mapping = (status.get(part) or {}).get("node_type_mapping") or {}
                seen |= {node for node, kind in mapping.items() if kind == node_type}
        return seen

    def launched(self, since: float = 0.0) -> list[str]:
        return [m.split("of type ")[1].rstrip(".") for _, m in self.events(since) if "Adding" in m]

    def removed(self, since: float = 0.0) -> list[str]:
        return [
            m.split("of type ")[1].split(" ")[0] for _, m in self.events(since) if "Removing" in m
        ]

    def wait_until(self, pred, timeout_s: float, what: str, poll_s: float = 1.0) -> float:
        t = time.time()
        while time.time() - t < timeout_s:
            if pred():
                return time.time() - t
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                             f"active workers {self.workers()}; events {self.events()}")  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config = fake_cluster_config(
        launcher, gcs_address=f"127.0.0.1:{free_port()}", idle_timeout_minutes=IDLE_TIMEOUT_MIN
    )
    temp = f"/tmp/exits-fake-{os.getpid()}-{free_port()}"  # short: socket paths <= 107 chars
    fake = FakeCluster(config, temp)
    fake.start()
    watch = AutoscalerWatch(fake)
    try:
        yield fake, watch
    finally:
        watch.stop()
        fake.stop()
        leftover = fake.processes()
        fake.cleanup()
        assert not leftover, f"processes of the test cluster still alive: {leftover}"


def submit(
    cluster: FakeCluster, output: str, stages: list[str], extra: list[str] = (), timeout_s=240
):
    """``jobs/pipeline.py`` as ``ray job submit`` runs it: a driver with RAY_ADDRESS set."""
    cmd = [sys.executable, "jobs/pipeline.py", "--dataset", "demo", "--quick", "--output", output,
           "--stages", *stages]  # fmt: skip
    for o in [*cloud_overrides(), *extra]:
        cmd += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """Stages prepare, 1a, 1b submitted once; the facts the tests check afterwards."""
    fake, watch = cluster
    run = str(tmp_path_factory.mktemp("autoscaling") / "run")
    t0 = time.time()
    _ok(submit(fake, run, ["prepare", "warmup", "generator"]))
    seconds = time.time() - t0
    launched = watch.launched(t0)
    idle_s = watch.wait_until(lambda: not watch.workers(), 90, "the training node to go away")
    return {"run": run, "t0": t0, "seconds": seconds, "launched": launched,
            "removed": watch.removed(t0), "removed_after_s": idle_s}  # fmt: skip


def test_stages_start_their_node_types_and_give_them_back(cluster, trained):
    fake, watch = cluster
    run = trained["run"]
    # Ray Train (1a, 1b): gpu_train, never the spot labelling type; removed once idle
    assert "gpu_train" in trained["launched"] and "gpu_label" not in trained["launched"]
    assert "gpu_train" in trained["removed"]

    t1 = time.time()
    _ok(submit(fake, run, ["label"]))
    label_s = time.time() - t1
    launched = watch.launched(t1)
    assert "gpu_label" in launched and "cpu_decode" in launched, launched
    # Not asserted: "gpu_train not launched in 1c". Our actors and tasks are pinned (GPU /
    # decode_node), but Ray Data 2.60's rate-based cluster autoscaler also sends CPU-only
    # scale-up hints (custom resources dropped in its _to_resource_bundle); once cpu_decode is
    # at max_workers the autoscaler may meet them with a GPU node type (seen under load).
    idle_s = watch.wait_until(lambda: not watch.workers(), 90, "every worker node to go away")
    assert set(launched) <= set(watch.removed(t1))

    # stage 2 (mmdet under Ray Train, {CPU: 1, GPU: 1, train_node: 0.001}): gpu_train only
    t2 = time.time()
    _ok(submit(fake, run, ["stage2"], timeout_s=420))
    stage2_s = time.time() - t2
    launched2 = watch.launched(t2)
    assert launched2 and set(launched2) == {"gpu_train"}, launched2
    stage2_idle_s = watch.wait_until(lambda: not watch.workers(), 90, "the stage-2 node to go away")
    assert "gpu_train" in watch.removed(t2)
    stage2 = manifest.read_manifest(run, "stage2")
    assert stage2["config"]["use_gpu"] and stage2["config"]["logical_gpus"]
    assert stage2["config"]["node_resource"] == "train_node"

    for stage in ("prepare", "warmup", "generator", "label", "stage2"):
        assert manifest.read_manifest(run, stage) is not None, stage
    summary = manifest.read_manifest(run, "label")["summary"]
    assert summary["instances"] == summary["masks"] + summary["errors"] > 0
    # no demand the autoscaler could not place, ever; nothing left pending at the end
    assert "No available node types can fulfill" not in fake.monitor_log()
    assert not [m for _, m in watch.events(trained["t0"]) if "Error" in m]
    final = watch.status()["load_metrics_report"]
    assert final["resource_demand"] == [] and final["pg_demand"] == []
    print(f"\nautoscaling: 1a+1b {trained['seconds']:.0f} s, nodes gone "
          f"{trained['removed_after_s']:.0f} s later; label {label_s:.0f} s, nodes gone "
          f"{idle_s:.0f} s later; stage 2 {stage2_s:.0f} s, node gone {stage2_idle_s:.0f} s later; "
          f"events: {[m for _, m in watch.events(trained['t0'])]}")  # fmt: skip


def _label_actor_running(fake: FakeCluster) -> bool:
    """A Ray Data map actor (``ray::MapWorker(...GeneratorStage...)``) runs on a gpu_label node."""
    for pid in fake.raylet_pids("gpu_label").values():
        try:
            children = psutil.Process(pid).children()
            if any("MapWorker" in " ".join(c.cmdline()) for c in children):
                return True
        except psutil.Error:
            continue
    return False


def test_labelling_survives_a_node_removed_under_it(cluster, trained, tmp_path):
    fake, watch = cluster
    run = str(tmp_path / "run")
    for stage in ("prepare", "warmup", "generator"):  # stage 1 as trained, labelling anew
        shutil.copytree(os.path.join(trained["run"], stage), os.path.join(run, stage))
    masks = Path(run) / "label" / "masks"
    t1 = time.time()
    extra = ["label.shard_images=1"]  # one image per shard: the commit/resume unit is small
    results: list = []
    job = threading.Thread(target=lambda: results.append(submit(fake, run, ["label"], extra)))
    job.start()
    # a spot reclaim: kill the labelling node's raylet once the labelling actor runs there
    watch.wait_until(lambda: _label_actor_running(fake), 240, "the labelling actor", poll_s=0.1)
    label_nodes = fake.raylet_pids("gpu_label")
    done_at_kill = len(list(masks.iterdir())) if masks.exists() else 0
    for pid in label_nodes.values():
        os.kill(pid, 9)
    killed_at = time.time()
    job.join(timeout=400)
    attempts = 1
    if results[0].returncode != 0:  # the job died with the node: re-submitting resumes it
        attempts += 1
        results.append(submit(fake, run, ["label"], extra))
    _ok(results[-1])
    label_s = time.time() - t1
    summary = manifest.read_manifest(run, "label")["summary"]
    assert summary["instances"] == summary["masks"] + summary["errors"] > 0
    from exits.label import read_errors, read_masks

    ids = [*read_masks(run)["ann_id"].to_pylist(), *read_errors(run)["ann_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == summary["instances"] + summary["prepare_errors"]
    assert len(list(masks.iterdir())) == summary["shards"] > done_at_kill  # killed mid-run
    # the autoscaler replaced the node: another gpu_label node came up after the kill
    replacements = watch.nodes_seen("gpu_label", killed_at + 1) - set(label_nodes)
    assert replacements, (label_nodes, watch.events(t1))
    assert storage.exists(storage.join(run, "label", "pseudo_coco.json"))
    print(f"\nnode kill: {done_at_kill}/{summary['shards']} shard(s) committed before the kill, "
          f"{attempts} submission(s), {label_s:.0f} s; events: {[m for _, m in watch.events(t1)]}")  # fmt: skip


def test_an_edited_copy_of_aws_yaml_is_refused_before_any_work(tmp_path):
    """The same fake cluster from a copy of aws.yaml whose GPU types lost what the stages ask
    for: the job reads the node types from the running autoscaler's config and stops at once,
    naming the stage, the request and the node types (without it, it would wait forever)."""
    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    types = launcher["available_node_types"]
    types["gpu_train"]["resources"].pop("train_node")  # Ray Train's pin is gone
    types["gpu_label"]["resources"]["gpu"] = types["gpu_label"]["resources"].pop("GPU")  # typo
    types["gpu_train"]["resources"]["gpu"] = types["gpu_train"]["resources"].pop("GPU")
    config = fake_cluster_config(launcher, gcs_address=f"127.0.0.1:{free_port()}")
    fake = FakeCluster(config, f"/tmp/exits-fake-{os.getpid()}-{free_port()}")
    fake.start()
    try:
        t = time.time()
        proc = submit(fake, str(tmp_path / "run"), ["prepare", "warmup", "label"], timeout_s=120)
        seconds = time.time() - t
    finally:
        fake.stop()
        leftover = fake.processes()
        fake.cleanup()
    assert proc.returncode != 0
    err = proc.stderr
    assert "UnsatisfiableRequest" in err and "autoscaler config" in err, err[-3000:]
    assert "stage 'warmup': Ray Train worker requests {GPU: 1, train_node: 0.001}" in err
    assert "stage 'label': labelling actor requests {CPU: 1, GPU: 1}" in err
    assert "gpu_label {CPU: 2, gpu: 1} (max 2)" in err
    assert not (tmp_path / "run" / "prepare" / "manifest.json").exists()  # no stage ran
    assert not leftover
    print(f"\nrefused in {seconds:.0f} s (driver start included)")
