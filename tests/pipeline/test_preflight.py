"""Preflight (exits.pipeline.preflight): stage requests vs node types, without a Ray cluster.

The cluster files are checked against the cloud profiles here, offline; a copy of a file whose
node type no longer offers what a stage requests is refused with the stage, the request and
the node types in the message. tests/pipeline/test_autoscaling.py runs the same node types
under Ray's autoscaler.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from exits import manifest, pipeline
from exits.config import load_config
from exits.pipeline import preflight
from exits.pipeline.preflight import (
    NodeType,
    ResourceRequest,
    check_requests,
    node_types_from_kuberay,
    node_types_from_launcher_config,
    node_types_from_live_nodes,
    stage_requests,
)

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
CLOUD_PROFILES = ("coco", "lvis", "voc")
TRAIN_STAGES = ("warmup", "generator", "stage2")
ALL_STAGES = list(manifest.STAGES)


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _kuberay_cluster() -> dict:
    docs = yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())
    return next(d for d in docs if d and d.get("kind") == "RayCluster")


def _node_types(name: str) -> list[NodeType]:
    if name == "kuberay.yaml":
        return node_types_from_kuberay(_kuberay_cluster())
    return node_types_from_launcher_config(_launcher(name))


def _fitting(request: ResourceRequest, types: list[NodeType]) -> set[str]:
    return {t.name for t in types if check_requests([request], [t]).problems == []}


# --------------------------------------------------------------------------------------
# the pure check
# --------------------------------------------------------------------------------------
TYPES = [
    NodeType("head", {"CPU": 0}, 1),
    NodeType("gpu_train", {"CPU": 48, "GPU": 4, "train_node": 1}, 4),
    NodeType("gpu_label", {"CPU": 4, "GPU": 1}, 16),
]


def test_a_request_that_fits_a_node_type_passes():
    r = ResourceRequest("label", "labelling actor", {"CPU": 1, "GPU": 1}, 16)
    assert check_requests([r], TYPES).problems == []


def test_a_resource_no_node_type_offers_is_a_problem_naming_stage_request_and_types():
    r = ResourceRequest("label", "labelling actor", {"CPU": 1, "TPU": 1}, 2)
    (msg,) = check_requests([r], TYPES).problems
    assert "stage 'label'" in msg and "labelling actor" in msg and "TPU: 1" in msg
    assert "gpu_train {CPU: 48, GPU: 4, train_node: 1} (max 4)" in msg and "gpu_label" in msg


def test_a_request_larger_than_every_node_is_a_problem():
    r = ResourceRequest("stage2", "Ray Train worker", {"CPU": 64, "GPU": 1}, 1, gang=True)
    assert len(check_requests([r], TYPES).problems) == 1


def test_gang_capacity_is_a_problem_but_a_large_actor_pool_only_warns():
    train = ResourceRequest("warmup", "Ray Train worker", {"GPU": 1, "train_node": 0.001}, 17, True)
    report = check_requests([train], TYPES)  # 4 nodes x 4 GPUs = 16 < 17
    assert len(report.problems) == 1 and "at most 16" in report.problems[0]
    pool = ResourceRequest("label", "labelling actor", {"CPU": 4, "GPU": 1}, 40)
    report = check_requests([pool], TYPES)  # 16 gpu_label + 16 gpu_train slots < 40
    assert report.problems == [] and len(report.warnings) == 1


def test_node_types_of_unknown_size_turn_a_problem_into_a_warning():
    r = ResourceRequest("label", "labelling actor", {"GPU": 1})
    report = check_requests([r], [NodeType("head", {"CPU": 0}, 1), NodeType("auto", None)])
    assert report.problems == [] and "unknown size: auto" in report.warnings[0]


def test_zero_max_count_and_unbounded_types():
    r = ResourceRequest("warmup", "Ray Train worker", {"GPU": 1}, 100, gang=True)
    assert check_requests([r], [NodeType("g", {"GPU": 1}, 0)]).problems
    assert not check_requests([r], [NodeType("g", {"GPU": 1}, -1)]).problems


# --------------------------------------------------------------------------------------
# stage requests mirror what the stages pass to Ray
# --------------------------------------------------------------------------------------
def test_stage_requests_match_ray_trains_scaling_config():
    from ray.train import ScalingConfig

    from exits.train.run import worker_resources

    for name in ("demo", "coco"):
        cfg = load_config(name)
        for stage in ("warmup", "generator"):
            t = getattr(cfg, stage)
            (req,) = stage_requests(cfg, [stage])
            sc = ScalingConfig(
                num_workers=t.num_workers,
                use_gpu=t.use_gpu,
                resources_per_worker=worker_resources(t.use_gpu, t.node_resource),
            )
            assert dict(req.resources) == sc._resources_per_worker_not_none, (name, stage)
            assert req.count == t.num_workers and req.gang


def test_stage_requests_of_the_cloud_profile():
    cfg = load_config("coco")
    reqs = {(r.stage, r.what): r for r in stage_requests(cfg, ALL_STAGES)}
    assert set(s for s, _ in reqs) == {"warmup", "generator", "label", "stage2"}
    assert reqs["warmup", "Ray Train worker"].resources == {"GPU": 1, "train_node": 0.001}
    assert reqs["label", "labelling actor"].resources == {"CPU": 1, "GPU": 1}
    assert reqs["label", "labelling actor"].count == 16
    assert reqs["label", "decode/paste task"].resources == {"CPU": 1, "decode_node": 0.001}
    assert reqs["stage2", "Ray Train worker"].resources == {"CPU": 8, "GPU": 1, "train_node": 0.001}


# --------------------------------------------------------------------------------------
# the cluster files against the cloud profiles (offline)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cluster", ["aws.yaml", "gcp.yaml", "kuberay.yaml"])
@pytest.mark.parametrize("profile", CLOUD_PROFILES)
def test_cloud_profiles_fit_the_cluster_files(profile, cluster):
    report = check_requests(stage_requests(load_config(profile), ALL_STAGES), _node_types(cluster))
    assert report.problems == [] and report.warnings == []


@pytest.mark.parametrize("cluster", ["aws.yaml", "gcp.yaml", "kuberay.yaml"])
def test_each_stage_lands_on_its_node_type(cluster):
    """Training fits only the on-demand 4-GPU type, decode tasks only the CPU type; labelling
    actors fit the 1-GPU type."""
    types = _node_types(cluster)
    sep = "-" if cluster == "kuberay.yaml" else "_"
    for r in stage_requests(load_config("coco"), ALL_STAGES):
        if r.stage in TRAIN_STAGES:
            assert _fitting(r, types) == {f"gpu{sep}train"}, r
        elif r.what == "labelling actor":
            assert f"gpu{sep}label" in _fitting(r, types), r
        else:
            assert _fitting(r, types) == {f"cpu{sep}decode"}, r


def test_node_types_read_from_the_files():
    aws = {t.name: t for t in _node_types("aws.yaml")}
    assert aws["head"].resources == {"CPU": 0} and aws["head"].max_count == 1
    assert aws["gpu_label"].resources == {"CPU": 4, "GPU": 1} and aws["gpu_label"].max_count == 16
    kube = {t.name: t for t in _node_types("kuberay.yaml")}
    assert kube["gpu-train"].resources == {"CPU": 44, "GPU": 4, "train_node": 1}
    assert kube["head"].resources == {"CPU": 0}
    assert kube["cpu-decode"].resources == {"CPU": 30, "decode_node": 1}


@pytest.mark.parametrize(
    "edit, stage",
    [
        # gpu_label loses its GPU (a typo in one num_gpus)
        (lambda c: c["available_node_types"]["gpu_label"]["resources"].pop("GPU"), None),
        # the GPU resource name misspelt on every GPU type
        (
            lambda c: [
                t["resources"].update(gpu=t["resources"].pop("GPU", 0))
                for t in c["available_node_types"].values()
            ],
            "label",
        ),  # fmt: skip
        # gpu_train no longer declares train_node: Ray Train would wait forever
        (lambda c: c["available_node_types"]["gpu_train"]["resources"].pop("train_node"), "warmup"),
        # gpu_train shrunk below stage 2's CPUs per worker
        (lambda c: c["available_node_types"]["gpu_train"]["resources"].update(CPU=4), "stage2"),
        # too few training nodes for 8 GPU workers
        (lambda c: c["available_node_types"]["gpu_train"].update(max_workers=1), "warmup"),
    ],
)
def test_an_edited_copy_of_aws_yaml_is_refused(edit, stage, tmp_path):
    config = copy.deepcopy(_launcher("aws.yaml"))
    edit(config)
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(config))
    types = node_types_from_launcher_config(yaml.safe_load(path.read_text()))
    report = check_requests(stage_requests(load_config("coco"), ALL_STAGES), types)
    if stage is None:  # gpu_label without GPU: actors still fit gpu_train, nothing waits forever
        assert report.problems == []
        return
    assert report.problems, report
    assert any(p.startswith(f"stage {stage!r}") for p in report.problems), report.problems


def test_live_nodes_grouped_by_shape():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9, "node:1.2.3.4": 1.0}},
        {"Alive": True, "Resources": {"CPU": 2.0, "memory": 2e9, "node:1.2.3.5": 1.0}},
        {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}},
    ]
    (t,) = node_types_from_live_nodes(nodes)
    assert t.resources == {"CPU": 2.0} and t.max_count == 2


# --------------------------------------------------------------------------------------
# the runner refuses before any stage runs
# --------------------------------------------------------------------------------------
def test_pipeline_refuses_unsatisfiable_requests_before_any_stage(tmp_path, monkeypatch):
    import ray

    calls: list[str] = []

    def make(stage):
        def run(cfg, run_dir, fp):
            calls.append(stage)
            return manifest.write_manifest(run_dir, stage, fp, time.time())

        return run

    monkeypatch.setattr(pipeline.runner, "STAGE_FUNCS", {s: make(s) for s in manifest.STAGES})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    # the coco profile's s3 jsons are not reachable here: fingerprint their names only
    monkeypatch.setattr(manifest, "content_digest", lambda *uris, **_: {u: u for u in uris if u})
    cpu_only = [NodeType("head", {"CPU": 0}, 1), NodeType("cpu_decode", {"CPU": 32}, 8)]
    monkeypatch.setattr(preflight, "cluster_node_types", lambda: (cpu_only, "test cluster"))
    t = time.time()
    with pytest.raises(preflight.UnsatisfiableRequest) as e:
        pipeline.run_pipeline(load_config("coco"), str(tmp_path / "run"))
    assert time.time() - t < 5 and calls == []
    text = str(e.value)
    assert "stage 'warmup': Ray Train worker requests {GPU: 1, train_node: 0.001}" in text
    assert "stage 'label': labelling actor requests {CPU: 1, GPU: 1}" in text
    assert "cpu_decode {CPU: 32} (max 8)" in text and "test cluster" in text
    # the CPU stages it can run are not refused; an unreadable autoscaler refuses nothing
    pipeline.run_pipeline(load_config("coco"), str(tmp_path / "run"), stages=["prepare"])
    assert calls == ["prepare"]
    monkeypatch.setattr(preflight, "cluster_node_types", lambda: (None, "unreadable"))
    pipeline.run_pipeline(load_config("coco"), str(tmp_path / "run"), stages=["warmup"])
    assert calls == ["prepare", "warmup"]


def test_without_ray_nothing_is_checked(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert preflight.check_cluster(load_config("coco"), ALL_STAGES).problems == []
