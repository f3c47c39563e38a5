"""The deployment files in deploy/: they parse and carry what an operator's path relies on. No cluster needed.

Most checks are structural (required fields, resource names, bounds, secrets only by reference). Three use the
real consumer: the cluster-launcher YAML goes through Ray's own config validation, the RayJob entrypoint through
`cdetr run`'s argument parser and config model, and the Redis StatefulSet's start-up script and redis.conf run a
real redis-server.
"""
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import redis
import yaml

from pipeline.config import load_config
from pipeline.redis_server import is_listening
from pipeline.wire import DEFAULT_PREFIX, frames_key

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml")) + sorted((DEPLOY / "redis").glob("*.yaml"))
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
REDIS = DEPLOY / "redis" / "redis.yaml"
SECRET_EXAMPLE = DEPLOY / "redis" / "secret.example.yaml"
LAUNCHER = DEPLOY / "cluster-launcher.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

PLACEHOLDER = "REPLACE"  # what every example secret value contains
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|REDIS__URL|API_KEY", re.IGNORECASE)
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_BINARY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str, name: str | None = None) -> dict:
    found = [d for d in _docs(path) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{path.name}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _walk(node, path=()):
    """Every (path, mapping) in a parsed YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, path + (i,))


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("16Gi", "512Mi", "1000000000") in bytes."""
    for suffix, factor in _BINARY_SUFFIX.items():
        if quantity.endswith(suffix):
            return int(float(quantity[:-2]) * factor)
    return int(quantity)


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's convention: the Ray container comes first


def _groups(spec: dict) -> dict[str, dict]:
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- every Kubernetes manifest ---

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_objects_are_named_and_typed(path):
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: object without apiVersion/kind"
        name = doc.get("metadata", {}).get("name", "")
        assert DNS_1123.match(name) and len(name) <= 63, f"{path.name}: bad metadata.name {name!r} of {doc['kind']}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_containers_have_pinned_images_and_limits(path):
    for doc in _docs(path):
        for where, node in _walk(doc):
            if not (isinstance(node.get("image"), str) and "name" in node and where[-2:-1] == ("containers",)):
                continue
            image = node["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), \
                f"{path.name} {where}: image {image!r} has no pinned tag"
            assert "memory" in node.get("resources", {}).get("limits", {}), f"{path.name} {where}: no memory limit"


# --- no secrets in plain text ---

@pytest.mark.parametrize("path", MANIFESTS + [LAUNCHER], ids=lambda p: p.name)
def test_secret_values_come_from_secret_refs(path):
    for doc in _docs(path):
        if doc.get("kind") == "Secret":
            assert path.name.endswith(".example.yaml"), f"{path.name}: a real Secret does not belong in the repo"
            values = {**doc.get("stringData", {}), **doc.get("data", {})}
            assert values and all(PLACEHOLDER in v for v in values.values()), \
                f"{path.name}: example Secret values must be placeholders containing {PLACEHOLDER!r}"
            continue
        for where, node in _walk(doc):
            for key in node:
                assert str(key).lower() not in ("password", "requirepass"), f"{path.name} {where}: plaintext {key}"
            if "name" in node and ("value" in node or "valueFrom" in node) and SECRET_NAME.search(node["name"]):
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], \
                    f"{path.name} {where}: env {node['name']} must come from valueFrom.secretKeyRef"


def test_no_credentials_in_any_deploy_file():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        for user_info in re.findall(r"rediss?://([^@/\s]*)@", text):
            # Allowed: placeholders (REPLACE..., <password>) and shell variables ($PASSWORD).
            assert any(mark in user_info for mark in (PLACEHOLDER, "<", "$")), \
                f"{path.name}: Redis URL with a literal password: {user_info!r}"
        assert not re.findall(r"^\s*requirepass\s+\S", text, re.MULTILINE), f"{path.name}: literal requirepass"


def test_secret_example_matches_what_the_manifests_reference():
    secret = _one(SECRET_EXAMPLE, "Secret")
    text = SECRET_EXAMPLE.read_text()
    assert "kubectl create secret generic " + secret["metadata"]["name"] in text, \
        "the example must show the kubectl command that creates the real Secret"
    refs = {(node["secretKeyRef"]["name"], node["secretKeyRef"]["key"])
            for path in MANIFESTS for doc in _docs(path) for _, node in _walk(doc) if "secretKeyRef" in node}
    assert refs, "no manifest reads the Secret"
    for name, key in refs:
        if name == secret["metadata"]["name"]:
            assert key in secret["stringData"], f"Secret key {key!r} is referenced but not in the example"
            assert f"--from-literal={key}=" in text, f"the kubectl command does not set key {key!r}"


# --- RayCluster ---

def test_raycluster_groups_resources_and_autoscaling():
    cluster = _one(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = _groups(spec)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head must not run decoders or workers"
    assert {"decoders", "gpu"} <= set(groups), f"worker groups: {sorted(groups)}"
    for group in spec["workerGroupSpecs"]:
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high and high >= 1, \
            f"group {group['groupName']}: replicas bounds {low}..{high}"

    decoders = groups["decoders"]
    resources = json.loads(json.loads(decoders["rayStartParams"]["resources"]))  # KubeRay's quoted JSON string
    assert resources.get("decoder", 0) >= 1
    assert "nvidia.com/gpu" not in _ray_container(decoders)["resources"]["limits"]

    gpu = _ray_container(groups["gpu"])["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1
    # Kubernetes only accepts an extended resource with equal request and limit.
    assert gpu["requests"].get("nvidia.com/gpu", gpu["limits"]["nvidia.com/gpu"]) == gpu["limits"]["nvidia.com/gpu"]


def test_raycluster_object_store_fits_in_pod_memory():
    # The object store lives in /dev/shm, which counts against the container's memory limit.
    for name, group in _groups(_one(RAYCLUSTER, "RayCluster")["spec"]).items():
        store = int(group["rayStartParams"]["object-store-memory"])
        limit = _bytes(_ray_container(group)["resources"]["limits"]["memory"])
        assert 0 < store <= limit // 2, f"group {name}: object store {store} B vs memory limit {limit} B"


def test_raycluster_pods_are_probed_and_expose_metrics():
    for name, group in _groups(_one(RAYCLUSTER, "RayCluster")["spec"]).items():
        container = _ray_container(group)
        assert container["image"], f"group {name}: no image"
        assert container.get("readinessProbe") and container.get("livenessProbe"), f"group {name}: no probes"
        metrics_port = int(group["rayStartParams"]["metrics-export-port"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("metrics") == metrics_port, f"group {name}: port `metrics` is not {metrics_port}"
    monitor = _one(DEPLOY / "kuberay" / "podmonitor.yaml", "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_ray_version_matches_the_image():
    ray_version = _dockerfile_arg("RAY_VERSION")
    assert _one(RAYCLUSTER, "RayCluster")["spec"]["rayVersion"] == ray_version
    assert _one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    assert f'"ray[default]=={ray_version}"' in LAUNCHER.read_text()


def test_head_env_is_valid_pipeline_config():
    # Every CDETR_* variable the head sets must be a field of pipeline.config, or `cdetr run` refuses to start.
    env = {}
    for var in _ray_container(_one(RAYCLUSTER, "RayCluster")["spec"]["headGroupSpec"])["env"]:
        env[var["name"]] = var.get("value", "redis://:secret@cdetr-redis:6379/0")  # a Secret's value stands in
    config = load_config(env=env)
    assert config.redis.url == "redis://:secret@cdetr-redis:6379/0"
    assert config.workers.num_gpus == 1
    # Ray's CPU accounting and the decoder resource agree on how many streams a decoder pod takes.
    decoders = _groups(_one(RAYCLUSTER, "RayCluster")["spec"])["decoders"]
    cpus = float(_ray_container(decoders)["resources"]["limits"]["cpu"])
    slots = json.loads(json.loads(decoders["rayStartParams"]["resources"]))["decoder"]
    assert cpus / config.decoder.num_cpus == slots


# --- RayJob ---

def test_rayjob_runs_cdetr_run_on_the_cluster_of_raycluster_yaml():
    job = _one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"] == _one(RAYCLUSTER, "RayCluster")["spec"], \
        "rayjob.yaml's rayClusterSpec has drifted from raycluster.yaml"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["cdetr", "run"]
    assert "--ray-address" in argv
    assert "--redis-url" not in argv and "redis://" not in job["spec"]["entrypoint"], \
        "the Redis URL must come from the head's Secret-backed env, not the (shell-expanded, stored) entrypoint"


def test_rayjob_entrypoint_is_accepted_by_cdetr_run():
    import argparse

    from pipeline.run_command import _overrides, add_arguments  # the real `cdetr run` parser (imports torch: slow-ish)

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(shlex.split(_one(RAYJOB, "RayJob")["spec"]["entrypoint"])[2:])
    config = load_config(env={}, overrides=_overrides(args))
    assert config.ray_address == "auto"
    assert len(config.sources) >= 2 and all(not s.live for s in config.sources)


# --- Redis ---

def test_redis_config_persists_and_requires_the_secret_password(tmp_path):
    """Run the StatefulSet's own start-up script and redis.conf (mount paths moved under tmp_path)."""
    config_text = _one(REDIS, "ConfigMap")["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", config_text, re.MULTILINE)
    pod = _one(REDIS, "StatefulSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    script = container["args"][0]
    assert container["command"] == ["sh", "-c"]

    assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == \
        _one(REDIS, "ConfigMap")["metadata"]["name"]
    # Each volume's mount path becomes a directory under tmp_path (one regex pass: no path is rewritten twice).
    local = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    for directory in local.values():
        directory.mkdir()
    mount_path = re.compile("|".join(re.escape(m) for m in sorted(local, key=len, reverse=True)))
    script, config_text = (mount_path.sub(lambda m: str(local[m.group(0)]), t) for t in (script, config_text))
    port = _free_port()
    config_text = re.sub(r"^port \d+$", f"port {port}", config_text, flags=re.MULTILINE)
    config_text = re.sub(r"^bind .*$", "bind 127.0.0.1", config_text, flags=re.MULTILINE)
    (tmp_path / "config" / "redis.conf").write_text(config_text)
    env = {"PATH": f"{Path(shutil.which('redis-server')).parent}:/usr/bin:/bin"}

    placeholder = _one(SECRET_EXAMPLE, "Secret")["stringData"]["password"]
    refused = subprocess.run(["sh", "-c", script], env={**env, "REDIS_PASSWORD": placeholder},
                             capture_output=True, text=True, timeout=10)
    assert refused.returncode != 0 and "secret.example.yaml" in refused.stderr

    password = "0123456789abcdef" * 4
    server = subprocess.Popen(["sh", "-c", script], env={**env, "REDIS_PASSWORD": password},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not is_listening("127.0.0.1", port):
            assert server.poll() is None and time.monotonic() < deadline, f"redis did not start: {server.stderr}"
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(b"PING\r\n")
            assert plain.recv(100).startswith(b"-NOAUTH"), "Redis answers without the password"
        client = redis.Redis(port=port, password=password, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        key = frames_key(DEFAULT_PREFIX, "cam1")
        client.xadd(key, {"type": "frame", "json": "{}"}, id="1-0")
        aof = b"".join(p.read_bytes() for p in (tmp_path / "data" / "appendonlydir").glob("*.aof"))
        assert key.encode() in aof, "the acknowledged write is not in the AOF on the data volume"
        assert (tmp_path / "auth" / "auth.conf").stat().st_mode & 0o077 == 0, "password file readable by others"
    finally:
        server.terminate()
        server.wait(timeout=10)


# --- image and VM launcher ---

def test_the_installed_package_carries_the_bundled_model(tmp_path):
    """The image installs the project from a wheel, not editable: every file under model/weights/ must be in it."""
    root = DEPLOY.parent
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path)
    for package in ("model", "pipeline"):  # a copy, so the in-tree build leaves the checkout alone
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(tmp_path)], check=True, capture_output=True, timeout=300)
    packaged = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    assert {"model/__init__.py", "pipeline/cli.py", "pipeline/config.py"} <= packaged
    weights = {p.relative_to(root).as_posix() for p in (root / "model" / "weights").rglob("*") if p.is_file()}
    assert weights <= packaged, f"[tool.setuptools.package-data] misses {sorted(weights - packaged)}"


def test_dockerfile_builds_a_non_root_cuda_image_of_the_project():
    text = re.sub(r"^\s*#.*\n", "", DOCKERFILE.read_text(), flags=re.MULTILINE).replace("\\\n", " ")
    instructions = [line.strip().split(None, 1) for line in text.splitlines() if line.strip()]
    assert _dockerfile_arg("CUDA_BASE").startswith("nvidia/cuda:")
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    entrypoint = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoint == [["cdetr"]]
    copied = " ".join(args for op, args in instructions if op == "COPY")
    assert "model/" in copied and "pipeline/" in copied and "constraints.txt" in copied
    assert "-c constraints.txt" in DOCKERFILE.read_text()
    for op, args in instructions:
        if op in ("ENV", "ARG"):
            assert not SECRET_NAME.search(args), f"{op} {args}: secrets must not be baked into the image"


def test_cluster_launcher_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(raw))  # raises on a schema error
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    assert types[raw["head_node_type"]]["resources"].get("CPU") == 0
    assert types["decoder"]["resources"].get("decoder", 0) >= 1
    assert "gpu" in types
    for name, node_type in types.items():
        if name != raw["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"], f"node type {name}: bad bounds"
    assert any("-c ~/cdetr-stream/constraints.txt" in c for c in raw["setup_commands"])
