"""Offline checks of the cluster definitions in cluster/.

- cluster/aws.yaml, cluster/gcp.yaml: Ray's own cluster-launcher schema
  (ray/autoscaler/ray-schema.json) and Ray's `prepare_config` + `validate_config`, the
  same two calls `ray up` makes before it contacts the cloud. The cloud bootstrap that
  follows (`bootstrap_aws` / `bootstrap_gcp`: AMIs, IAM, subnets) needs boto3 / Google API
  clients and credentials, so it is not run here.
- cluster/kuberay.yaml: one RayCluster and one RayJob with the fields KubeRay requires
  (a small JSON schema below, plus KubeRay's own cross-field rules).
- Every YAML key carries a comment; the Dockerfile pins the Ray 2.60 base and the mmcv build.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
ALL_YAML_FILES = [*LAUNCHER_FILES, "kuberay.yaml"]
IMAGE_RE = re.compile(r"^ghcr\.io/OWNER/exits:\d+\.\d+\.\d+-ray2\.60-py311-gpu$")


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


# --------------------------------------------------------------------------------------
# (a) Ray cluster launcher configs
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_util():
    return pytest.importorskip("ray.autoscaler._private.util")


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    autoscaler = pytest.importorskip("ray.autoscaler")
    path = Path(autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"ray-schema.json not found next to {autoscaler.__file__}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_matches_ray_schema(name: str, ray_schema: dict[str, Any]) -> None:
    # The file as written (before Ray fills in defaults) against Ray's JSON schema.
    jsonschema.validate(_load(name), ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_passes_ray_prepare_and_validate(name: str, ray_util) -> None:
    raw = _load(name)
    prepared = ray_util.prepare_config(copy.deepcopy(raw))  # merges <provider>/defaults.yaml
    ray_util.validate_config(prepared)  # schema + head type + min_workers sum
    # Defaults must not have replaced our node types or the head's CPU: 0.
    assert set(prepared["available_node_types"]) == set(raw["available_node_types"])
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0  # filled by Ray for the head type


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_layout(name: str) -> None:
    config = _load(name)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    # CPU-only head on which no task or actor is scheduled.
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0

    workers = _worker_types(config)
    assert {"gpu_train", "gpu_label", "cpu_decode"} <= set(workers)
    gpu_types = {k for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_types == {"gpu_train", "gpu_label"}
    assert workers["gpu_train"]["resources"]["GPU"] >= 2  # multi-GPU Ray Train nodes
    assert workers["gpu_label"]["resources"]["GPU"] == 1  # one labelling actor per node
    assert workers["cpu_decode"]["resources"]["CPU"] >= 8

    for node_type, spec in workers.items():
        assert "min_workers" in spec and "max_workers" in spec, node_type
        assert 0 <= spec["min_workers"] <= spec["max_workers"], node_type
        assert spec["resources"].get("CPU", 0) > 0, node_type
        assert spec["max_workers"] <= config["max_workers"], node_type
    # The global cap is exactly the sum of the per-type caps: neither silently binding
    # nor promising nodes that no type can provide.
    assert config["max_workers"] == sum(s["max_workers"] for s in workers.values())
    assert sum(s["min_workers"] for s in workers.values()) <= config["max_workers"]
    assert 0 < config["upscaling_speed"]
    assert 0 < config["idle_timeout_minutes"] <= 60


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_image_and_commands(name: str) -> None:
    config = _load(name)
    docker = config["docker"]
    assert IMAGE_RE.match(docker["image"]), docker["image"]
    assert docker["container_name"]
    run_options = " ".join(docker["run_options"])
    assert "--ulimit nofile=" in run_options
    # /dev/shm (the object store) sized for the head and for every worker type.
    assert any(o.startswith("--shm-size=") for o in docker["head_run_options"])
    for node_type, spec in _worker_types(config).items():
        options = spec.get("docker", {}).get("worker_run_options", [])
        assert any(o.startswith("--shm-size=") for o in options), node_type
    # Everything is in the image.
    assert config["setup_commands"] == []
    assert config["file_mounts"] == {}
    head_cmds = config["head_start_ray_commands"]
    assert head_cmds[0] == "ray stop"
    assert "--head" in head_cmds[1]
    assert "--port=6379" in head_cmds[1]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds[1]
    assert "--dashboard-host=0.0.0.0" in head_cmds[1]
    worker_cmds = config["worker_start_ray_commands"]
    assert worker_cmds[0] == "ray stop"
    assert "--address=$RAY_HEAD_IP:6379" in worker_cmds[1]


def test_aws_capacity_and_iam() -> None:
    config = _load("aws.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert isinstance(config["provider"]["cache_stopped_nodes"], bool)
    for node_type, spec in config["available_node_types"].items():
        node_config = spec["node_config"]
        # S3 access through an instance profile on every node.
        assert node_config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), node_type
        assert node_config["ImageId"], node_type
        spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        # Spot only where a lost node costs little: labelling actors and decoding.
        assert spot == (node_type in {"gpu_label", "cpu_decode"}), node_type


def test_gcp_capacity_and_service_accounts() -> None:
    config = _load("gcp.yaml")
    provider = config["provider"]
    assert provider["type"] == "gcp"
    assert provider["region"] and provider["availability_zone"].startswith(provider["region"])
    assert provider["project_id"]
    for node_type, spec in _worker_types(config).items():
        node_config = spec["node_config"]
        scheduling = node_config.get("scheduling", {})
        assert isinstance(scheduling, dict), node_type  # GCE API object, not a list
        assert scheduling.get("preemptible", False) == (node_type in {"gpu_label", "cpu_decode"}), (
            node_type
        )
        if spec["resources"].get("GPU", 0):
            assert scheduling.get("onHostMaintenance") == "TERMINATE", node_type
        # Storage access through the node's service account.
        scopes = [s for account in node_config["serviceAccounts"] for s in account["scopes"]]
        assert any(s.endswith(("devstorage.read_write", "cloud-platform")) for s in scopes)


def test_gcp_head_has_its_own_scoped_account() -> None:
    """Issue 13: without serviceAccounts the head runs as Ray's ray-autoscaler-sa-v1, bound
    project-wide to storage.objectAdmin / compute.admin / iam.serviceAccountUser."""
    config = _load("gcp.yaml")
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    (account,) = head["serviceAccounts"]
    assert account["email"].startswith("exits-ray-head@")
    assert "ray-autoscaler" not in account["email"]
    assert not any(s.endswith("cloud-platform") for s in account["scopes"])
    readme = (CLUSTER / "README.md").read_text()
    assert "buckets add-iam-policy-binding" in readme and "roles/compute.instanceAdmin.v1" in readme


# --------------------------------------------------------------------------------------
# (b) KubeRay
# --------------------------------------------------------------------------------------

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DNS1035 = {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "image"],
                        "properties": {
                            "name": {"type": "string"},
                            "image": {"type": "string", "minLength": 1},
                        },
                    },
                }
            },
        }
    },
}
_RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {"rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE},
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "groupName",
                    "replicas",
                    "minReplicas",
                    "maxReplicas",
                    "rayStartParams",
                    "template",
                ],
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _STRING_MAP,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _DNS1035}}
KUBERAY_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "oneOf": [
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": "RayCluster"},
                "metadata": _METADATA,
                "spec": _RAY_CLUSTER_SPEC,
            },
        },
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": "RayJob"},
                "metadata": _METADATA,
                "spec": {
                    "type": "object",
                    "required": ["entrypoint"],
                    "oneOf": [
                        {"required": ["clusterSelector"]},
                        {"required": ["rayClusterSpec"]},
                    ],
                    "properties": {
                        "entrypoint": {"type": "string", "minLength": 1},
                        "clusterSelector": {
                            **_STRING_MAP,
                            "required": ["ray.io/cluster"],
                        },
                        "rayClusterSpec": _RAY_CLUSTER_SPEC,
                        "shutdownAfterJobFinishes": {"type": "boolean"},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "runtimeEnvYAML": {"type": "string"},
                        "submitterPodTemplate": _POD_TEMPLATE,
                    },
                },
            },
        },
        {
            # Any other Kubernetes object (the ServiceAccount).
            "type": "object",
            "required": ["apiVersion", "kind", "metadata"],
            "properties": {"kind": {"not": {"enum": ["RayCluster", "RayJob"]}}},
        },
    ],
}


@pytest.fixture(scope="module")
def kuberay_docs() -> list[dict[str, Any]]:
    text = (CLUSTER / "kuberay.yaml").read_text()
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def test_kuberay_documents_match_schema(kuberay_docs: list[dict[str, Any]]) -> None:
    jsonschema.Draft7Validator.check_schema(KUBERAY_SCHEMA)
    for doc in kuberay_docs:
        jsonschema.validate(doc, KUBERAY_SCHEMA)
    _one(kuberay_docs, "RayCluster")
    _one(kuberay_docs, "RayJob")


def test_kuberay_cluster(kuberay_docs: list[dict[str, Any]]) -> None:
    spec = _one(kuberay_docs, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert IMAGE_RE.match(head["template"]["spec"]["containers"][0]["image"])

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-train", "gpu-label", "cpu-decode"}
    gpus_per_pod = {}
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        container = group["template"]["spec"]["containers"][0]
        assert IMAGE_RE.match(container["image"]), name
        limits = container["resources"]["limits"]
        requests = container["resources"]["requests"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus == int(requests.get("nvidia.com/gpu", 0)), name
        assert (gpus > 0) == name.startswith("gpu-"), name
        if gpus:
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), name
        gpus_per_pod[name] = gpus
    assert gpus_per_pod["gpu-train"] >= 2  # multi-GPU Ray Train pods
    assert gpus_per_pod["gpu-label"] == 1  # one labelling actor per pod


def test_kuberay_job(kuberay_docs: list[dict[str, Any]]) -> None:
    cluster = _one(kuberay_docs, "RayCluster")
    job = _one(kuberay_docs, "RayJob")["spec"]
    assert job["entrypoint"].startswith("python jobs/pipeline.py --dataset lvis --output s3://")
    if "clusterSelector" in job:
        assert job["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # KubeRay's ValidateRayJobSpec: a TTL needs shutdownAfterJobFinishes.
    if job.get("ttlSecondsAfterFinished", 0) > 0:
        assert job["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["working_dir"]
    assert "EXITS_S3_ENDPOINT" not in runtime_env.get("env_vars", {})
    submitter = job.get("submitterPodTemplate")
    if submitter is not None:
        assert submitter["spec"]["restartPolicy"] == "Never"


# --------------------------------------------------------------------------------------
# (c) every key commented
# --------------------------------------------------------------------------------------

# A mapping key at the start of a line, possibly as the first key of a list item.
# Plain list items (`- ray stop`, `- --shm-size=8g`) carry no key and are exempt.
_KEY_LINE = re.compile(r"""^\s*(?:-\s+)?(?:[A-Za-z0-9_.\-/$]+|"[^"]*"|'[^']*')\s*:(?:\s|$)""")
_INLINE_COMMENT = re.compile(r"\s#")


def uncommented_keys(text: str) -> list[tuple[int, str]]:
    """Lines with a YAML key that have no comment on them or on the line just above."""
    bad = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#") or not _KEY_LINE.match(line):
            continue
        above = lines[i - 1].lstrip() if i > 0 else ""
        if not _INLINE_COMMENT.search(line) and not above.startswith("#"):
            bad.append((i + 1, line))
    return bad


def test_comment_check_catches_a_bare_key() -> None:
    text = "# doc\na: 1\nb: 2  # why\nc:\n  - ray stop\n  - key: v\n"
    assert uncommented_keys(text) == [(4, "c:"), (6, "  - key: v")]


@pytest.mark.parametrize("name", ALL_YAML_FILES)
def test_every_key_is_commented(name: str) -> None:
    bad = uncommented_keys((CLUSTER / name).read_text())
    assert not bad, f"{name}: keys without a comment:\n" + "\n".join(
        f"  line {n}: {line}" for n, line in bad
    )


# --------------------------------------------------------------------------------------
# (d) image definition
# --------------------------------------------------------------------------------------


def _base_images(dockerfile: str) -> list[str]:
    """Images of the FROM lines, with `ARG NAME=default` substituted; stage names dropped."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile, flags=re.M))
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, flags=re.M | re.I))
    images = []
    for ref in re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M):
        ref = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)
        if ref not in stages:
            images.append(ref)
    return images


def test_dockerfile_base_and_mmcv_build() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert _base_images(text) == ["rayproject/ray:2.60.0-py311-gpu"]
    # mmcv 2.1.0 built once, in its own stage, with the C++20 patch.
    assert "mmcv==2.1.0" in text
    assert "sed -i 's/-std=c++17/-std=c++20/g'" in text and "setup.py" in text
    assert '"setuptools<81"' in text
    assert "--no-build-isolation" in text
    for flag in ("MMCV_WITH_OPS=1", "FORCE_CUDA=1", 'TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"'):
        assert flag in text, flag
    assert re.search(r"^FROM\s+\S+\s+AS\s+mmcv-builder", text, flags=re.M)
    assert "COPY --from=mmcv-builder" in text
    # Pins shared with pyproject.toml; the package installed without moving them.
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
    assert re.search(r"pip install -c \S*constraints\.txt -e /app", text)
    assert re.search(r"^COPY\s+(--chown=\S+\s+)?\.\s+/app$", text, flags=re.M)
    assert re.search(r"^ENV HF_HUB_OFFLINE=1$", text, flags=re.M)
    assert text.rstrip().splitlines()[-1] == "WORKDIR /app"


def test_dockerfile_pins_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(
        re.match(r"^([\w-]+)(?:\[[^\]]*\])?==([\w.]+)$", d).groups() for d in deps if "==" in d
    )
    text = (CLUSTER / "Dockerfile").read_text()
    for package in ("torch", "torchvision", "mmcv", "ray"):
        assert f"{package}=={pins[package]}" in text, package
