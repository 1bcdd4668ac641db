"""Preflight: refuse a run whose Ray resource requests no node type of the cluster can satisfy.

An autoscaling cluster queues a request that no node type can hold forever (the autoscaler
logs a warning; the job waits). So before any stage runs, :func:`check_cluster` compares what
each selected stage will request with what the connected cluster can offer, and raises
:class:`UnsatisfiableRequest` naming the stage, the request and the node types.

Two layers:

- pure: :func:`stage_requests` (config -> :class:`ResourceRequest` per stage, the same numbers
  the stages pass to Ray), :func:`check_requests` (requests x :class:`NodeType` -> problems
  and warnings), and readers of node types from a cluster-launcher config
  (:func:`node_types_from_launcher_config`, ``cluster/aws.yaml``, ``gcp.yaml``), a KubeRay
  ``RayCluster`` (:func:`node_types_from_kuberay`) and ``ray.nodes()``
  (:func:`node_types_from_live_nodes`);
- Ray: :func:`cluster_node_types` finds the connected cluster's node types, in this order:
  the autoscaler's cluster config in the GCS (autoscaler v2, KubeRay), the config file of the
  autoscaler monitor serving this cluster's GCS on this machine (``ray up`` clusters: the
  driver runs on the head, next to the monitor; also Ray's fake multi-node cluster), else the
  live nodes. When an autoscaler runs but its node types cannot be read, nothing is refused.

A request fits a node type when every resource it asks for (> 0) is offered in at least that
amount per node. Ray Train workers are a gang (one placement group): they must fit all at
once within the node types' ``max_workers``. Actor pools start asynchronously, so a pool
larger than the cluster only warns. Memory is not checked (node types seldom declare it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exits.config import PipelineConfig
from exits.train.run import NODE_RESOURCE_SHARE, worker_resources

log = logging.getLogger("exits.pipeline")

# Resources Ray adds by itself; never part of a stage's request, ignored in node types.
_IMPLICIT = ("memory", "object_store_memory")
_IMPLICIT_PREFIXES = ("node:", "accelerator_type:")


@dataclass(frozen=True)
class ResourceRequest:
    """One resource bundle a stage asks Ray for.

    Args:
        stage: pipeline stage ("warmup", "label", ...).
        what: who asks, e.g. "Ray Train worker", "labelling actor", "decode task".
        resources: the bundle, e.g. {"CPU": 1, "GPU": 1} (Ray resource names).
        count: bundles wanted at the same time.
        gang: True when all ``count`` bundles must be placed together (a Ray Train placement
            group); False when each bundle starts on its own (actors, tasks).
    """

    stage: str
    what: str
    resources: Mapping[str, float]
    count: int = 1
    gang: bool = False


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster has or can start.

    Args:
        name: node type name (launcher ``available_node_types`` key, KubeRay group, or a
            description of live nodes).
        resources: Ray resources of one such node; None when unknown (then it is assumed to
            fit nothing, and an unfitting request only warns).
        max_count: how many such nodes can exist at once (-1: unbounded).
    """

    name: str
    resources: Mapping[str, float] | None
    max_count: int = -1


@dataclass
class PreflightReport:
    """``problems``: requests that would wait forever; ``warnings``: ones that only slow down."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class UnsatisfiableRequest(RuntimeError):
    """A stage asks for resources that no node type of the cluster offers."""


# --------------------------------------------------------------------------------------
# stage requests (pure)
# --------------------------------------------------------------------------------------
def _bundle(**resources: float) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if v}


def stage_requests(cfg: PipelineConfig, stages: Iterable[str]) -> list[ResourceRequest]:
    """What each of ``stages`` will ask Ray for, with ``cfg``'s numbers.

    Mirrors the stages: stage 1a/1b ``ScalingConfig(num_workers, use_gpu,
    resources_per_worker)`` (Ray's default bundle {"GPU": 1} with GPUs, else {"CPU": 1}, plus
    0.001 of ``node_resource`` when set); stage 1c's actor pool
    (``cpus_per_actor``, ``gpus_per_actor`` when ``use_gpu``) and its CPU decode / paste tasks
    ({"CPU": 1}, + ``decode_resource``); stage 2's ``ScalingConfig`` with ``resources_per_worker={"CPU":
    cpus_per_worker}`` (+ {"GPU": 1} with GPUs, + ``node_resource``). prepare and eval run
    in the driver.
    """
    out: list[ResourceRequest] = []
    for stage in stages:
        if stage in ("warmup", "generator"):
            t = cfg.warmup if stage == "warmup" else cfg.generator
            res = worker_resources(t.use_gpu, t.node_resource) or {}
            res = {**(_bundle(GPU=1) if t.use_gpu else _bundle(CPU=1)), **res}
            out.append(ResourceRequest(stage, "Ray Train worker", res, t.num_workers, gang=True))
        elif stage == "label":
            lc = cfg.label
            gpus = lc.gpus_per_actor if lc.use_gpu else 0
            res = _bundle(CPU=lc.cpus_per_actor, GPU=gpus)
            out.append(ResourceRequest(stage, "labelling actor", res, lc.num_actors))
            task = _bundle(CPU=1)
            if lc.decode_resource:
                task[lc.decode_resource] = NODE_RESOURCE_SHARE
            out.append(ResourceRequest(stage, "decode/paste task", task))
        elif stage == "stage2":
            s = cfg.stage2
            res = _bundle(CPU=s.cpus_per_worker, GPU=1 if s.use_gpu else 0)
            if s.node_resource:
                res[s.node_resource] = NODE_RESOURCE_SHARE
            out.append(ResourceRequest(stage, "Ray Train worker", res, s.num_workers, gang=True))
    return out


# --------------------------------------------------------------------------------------
# the check (pure)
# --------------------------------------------------------------------------------------
def _fmt(resources: Mapping[str, float] | None) -> str:
    if resources is None:
        return "{unknown}"
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _per_node(request: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many ``request`` bundles one node holds."""
    n = math.inf
    for k, v in request.items():
        if v > 0:
            n = min(n, math.floor(node.get(k, 0.0) / v + 1e-9))
    return int(n) if n != math.inf else 1 << 30


def describe_node_types(node_types: Sequence[NodeType]) -> str:
    parts = []
    for t in node_types:
        count = "unbounded" if t.max_count < 0 else f"max {t.max_count}"
        parts.append(f"{t.name} {_fmt(t.resources)} ({count})")
    return "; ".join(parts) or "(none)"


def check_requests(
    requests: Sequence[ResourceRequest], node_types: Sequence[NodeType]
) -> PreflightReport:
    """Problems (a request no node type fits; a gang larger than the node types can hold)
    and warnings (an actor pool larger than the cluster; node types of unknown size)."""
    report = PreflightReport()
    types = describe_node_types(node_types)
    unknown = [t.name for t in node_types if t.resources is None]
    for r in requests:
        usable = [t for t in node_types if t.resources is not None and t.max_count != 0]
        fits = [(t, _per_node(r.resources, t.resources)) for t in usable]
        fits = [(t, per) for t, per in fits if per > 0]
        head = f"stage {r.stage!r}: {r.what} requests {_fmt(r.resources)}"
        if not fits:
            msg = f"{head} (x{r.count}), which no node type offers; node types: {types}"
            if unknown:
                report.warnings.append(f"{msg} (unknown size: {', '.join(unknown)})")
            else:
                report.problems.append(msg)
            continue
        capacity = sum(math.inf if t.max_count < 0 else per * t.max_count for t, per in fits)
        if capacity >= r.count:
            continue
        where = ", ".join(f"{t.name}: {per} per node" for t, per in fits)
        msg = (f"{head} x{r.count} but the node types hold at most {capacity:g} at once "
               f"({where}); node types: {types}")  # fmt: skip
        (report.problems if r.gang else report.warnings).append(msg)
    return report


# --------------------------------------------------------------------------------------
# node types from configs (pure)
# --------------------------------------------------------------------------------------
def _clean(resources: Mapping[str, Any]) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in resources.items()
        if k not in _IMPLICIT and not str(k).startswith(_IMPLICIT_PREFIXES)
    }


def node_types_from_launcher_config(config: Mapping[str, Any]) -> list[NodeType]:
    """Node types of a Ray cluster-launcher config (``cluster/aws.yaml``, the autoscaler's
    bootstrap config). The head type counts as one node; a type without ``resources`` (Ray
    would look them up from the instance type) has unknown resources."""
    head = config.get("head_node_type")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        res = spec.get("resources")
        count = 1 if name == head else int(spec.get("max_workers", config.get("max_workers", -1)))
        out.append(NodeType(name, None if res is None else _clean(res), count))
    return out


def _quantity(text: Any) -> float:
    """A Kubernetes CPU quantity ("500m", "4", 4) in cores."""
    s = str(text)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def node_types_from_kuberay(ray_cluster: Mapping[str, Any]) -> list[NodeType]:
    """Node types of a KubeRay ``RayCluster``: the head group and each worker group, with the
    resources Ray infers from the container (CPU from ``limits.cpu``, GPU from
    ``nvidia.com/gpu``) unless ``rayStartParams`` set num-cpus / num-gpus / resources."""
    import json

    spec = ray_cluster["spec"]
    groups = [("head", spec["headGroupSpec"], 1)]
    groups += [(g["groupName"], g, int(g["maxReplicas"])) for g in spec.get("workerGroupSpecs", [])]
    out = []
    for name, group, count in groups:
        params = group.get("rayStartParams") or {}
        container = group["template"]["spec"]["containers"][0]
        limits = (container.get("resources") or {}).get("limits") or {}
        res: dict[str, float] = {}
        cpu = params.get("num-cpus", limits.get("cpu"))
        if cpu is not None:
            res["CPU"] = (
                float(math.floor(_quantity(cpu) + 1e-9)) if "num-cpus" not in params else float(cpu)
            )
        gpu = params.get("num-gpus", limits.get("nvidia.com/gpu"))
        if gpu is not None and float(gpu) > 0:
            res["GPU"] = float(gpu)
        if params.get("resources"):  # shell-quoted JSON, as in KubeRay's docs
            text = str(params["resources"]).strip().strip("'")
            if text.startswith('"') and text.endswith('"'):
                text = text[1:-1].replace('\\"', '"')
            res.update(_clean(json.loads(text)))
        out.append(NodeType(name, res, count))
    return out


def node_types_from_live_nodes(nodes: Iterable[Mapping[str, Any]]) -> list[NodeType]:
    """The alive nodes of ``ray.nodes()``, one node type per distinct resource shape."""
    shapes: dict[tuple, int] = {}
    for n in nodes:
        if n.get("Alive", n.get("alive", False)):
            key = tuple(sorted(_clean(n.get("Resources", {})).items()))
            shapes[key] = shapes.get(key, 0) + 1
    return [
        NodeType(f"live node{'s' if c > 1 else ''} x{c}", dict(k), c) for k, c in shapes.items()
    ]


# --------------------------------------------------------------------------------------
# the connected cluster (Ray)
# --------------------------------------------------------------------------------------
def _gcs_cluster_config() -> list[NodeType] | None:
    """Node groups the autoscaler reported to the GCS (autoscaler v2 / KubeRay), if any."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # older GCS or no such RPC: fall through to the other sources
        log.debug("preflight: no cluster config in the GCS", exc_info=True)
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeType(g.name, _clean(dict(g.resources)), int(g.max_count))
        for g in config.node_group_configs
    ]


def local_monitor(gcs_address: str) -> list[str] | None:
    """The command line of the autoscaler monitor serving ``gcs_address`` on this machine (a
    ``ray up`` head runs it beside the job drivers; a local ``ray.init`` starts a read-only one),
    else None."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(a.endswith("monitor.py") for a in cmd) and f"--gcs-address={gcs_address}" in cmd:
            return list(cmd)
    return None


def cluster_node_types() -> tuple[list[NodeType] | None, str]:
    """(node types, where they came from) for the connected Ray cluster; (None, why) when an
    autoscaler runs whose node types cannot be read (then nothing should be refused)."""
    import ray
    import yaml
    from ray.experimental.internal_kv import _internal_kv_get

    live = node_types_from_live_nodes(ray.nodes())
    from_gcs = _gcs_cluster_config()
    if from_gcs:
        return from_gcs + live, "autoscaler cluster config (GCS)"
    monitor = local_monitor(ray.get_runtime_context().gcs_address)
    if monitor is not None:
        flag = "--autoscaling-config="
        paths = [os.path.expanduser(a[len(flag) :]) for a in monitor if a.startswith(flag)]
        if paths and os.path.exists(paths[0]):
            with open(paths[0]) as f:
                types = node_types_from_launcher_config(yaml.safe_load(f))
            return types + live, f"autoscaler config {paths[0]}"
        if not paths:  # a read-only monitor: a fixed cluster
            return live, "live nodes (no autoscaling config)"
    # ray_constants.DEBUG_AUTOSCALING_STATUS: an autoscaler reports from elsewhere (KubeRay)
    if _internal_kv_get("__autoscaling_status") is not None:
        return None, "an autoscaler runs but its node types are not readable from here"
    return live, "live nodes (no autoscaler)"


def check_cluster(cfg: PipelineConfig, stages: Sequence[str]) -> PreflightReport:
    """Check ``stages``' requests against the connected cluster; raise
    :class:`UnsatisfiableRequest` on a problem, log warnings. No-op without Ray."""
    import ray

    requests = stage_requests(cfg, stages)
    if not requests or not ray.is_initialized():
        return PreflightReport()
    node_types, source = cluster_node_types()
    if node_types is None:
        log.warning("preflight: resource requests not checked: %s", source)
        return PreflightReport()
    report = check_requests(requests, node_types)
    for w in report.warnings:
        log.warning("preflight: %s", w)
    if report.problems:
        raise UnsatisfiableRequest(
            f"resource requests this cluster cannot satisfy (node types from {source}):\n  "
            + "\n  ".join(report.problems)
        )
    log.info("preflight: %d request(s) of %s fit (%s)", len(requests), list(stages), source)
    return report
