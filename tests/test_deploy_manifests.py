"""The deployment files in deploy/: they parse and carry what an operator's path relies on. No cluster needed.

Most checks are structural (required fields, resource names, bounds, secrets only by reference). Four use the
real consumer: the cluster-launcher YAML goes through Ray's own config validation, the RayJob entrypoint through
`cdetr run`'s argument parser and config model, the Redis StatefulSet's start-up script and redis.conf run a
real redis-server, and the Sentinel variant's scripts and config files run two data nodes and three sentinels
through a failover.
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
from pipeline.redis_url import parse_sentinel_url
from pipeline.sink import connect
from pipeline.wire import DEFAULT_PREFIX, frames_key

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = [p for d in ("kuberay", "redis", "redis-sentinel") for p in sorted((DEPLOY / d).glob("*.yaml"))]
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
REDIS = DEPLOY / "redis" / "redis.yaml"
SENTINEL = DEPLOY / "redis-sentinel" / "redis-sentinel.yaml"
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
        for user_info in re.findall(r"rediss?(?:\+sentinel)?://([^@/\s]*)@", text):
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


# --- Redis with Sentinel ---

SENTINEL_URL = re.compile(r"redis\+sentinel://:<password>@\S+")  # the one the Secret gets
POD_DNS_NAME = re.compile(r"cdetr-redis-(?:node|sentinel)-\d+\.cdetr-redis-(?:node|sentinel)")
PASSWORD = "0123456789abcdef" * 4  # a generated hex password, as deploy/redis/secret.example.yaml says


def test_sentinel_url_names_every_sentinel_and_the_monitored_service():
    """The URL the manifest (and deploy/README.md) tells operators to put in the Secret is accepted by `cdetr run`'s
    config, names every sentinel pod and the service the sentinels monitor; the quorum is a majority."""
    url = SENTINEL_URL.search(SENTINEL.read_text()).group(0)
    assert url in (DEPLOY / "README.md").read_text().replace("$PASSWORD", "<password>")
    parsed = parse_sentinel_url(load_config(env={"CDETR_REDIS__URL": url.replace("<password>", "s")}).redis.url)
    sentinels = _one(SENTINEL, "StatefulSet", "cdetr-redis-sentinel")["spec"]
    assert parsed.sentinels == [(f"cdetr-redis-sentinel-{i}.{sentinels['serviceName']}", 26379)
                                for i in range(sentinels["replicas"])]
    service, quorum = re.search(r"^sentinel monitor (\S+) \S+ 6379 (\d+)$",
                                _one(SENTINEL, "ConfigMap")["data"]["sentinel.conf"], re.MULTILINE).groups()
    assert parsed.service == service and parsed.options["password"] == "s"
    assert sentinels["replicas"] >= 3 and sentinels["replicas"] // 2 < int(quorum) <= sentinels["replicas"]
    assert _one(SENTINEL, "PodDisruptionBudget")["spec"]["minAvailable"] >= int(quorum)
    assert _one(SENTINEL, "StatefulSet", "cdetr-redis-node")["spec"]["replicas"] >= 2
    for statefulset in (d for d in _docs(SENTINEL) if d["kind"] == "StatefulSet"):
        # Pods find each other by these names while they start, before they are ready.
        headless = _one(SENTINEL, "Service", statefulset["spec"]["serviceName"])["spec"]
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True


def _start_pod(statefulset: str, ordinal: int, workdir: Path, addresses: dict[str, str], ports: dict[str, int]
               ) -> subprocess.Popen:
    """Run pod `ordinal` of a StatefulSet of redis-sentinel.yaml here: its container's own start-up script, env
    and config files, with every pod DNS name replaced by a loopback address (`addresses`), ports 6379 and 26379
    by free ones (`ports`), and each volume by a directory under `workdir` (kept across restarts, like a volume)."""
    spec = _one(SENTINEL, "StatefulSet", statefulset)["spec"]
    container = spec["template"]["spec"]["containers"][0]
    pod = f"{statefulset}-{ordinal}"
    address = addresses[f"{pod}.{spec['serviceName']}"]

    def local(text: str) -> str:
        text = re.sub(r"\b(2?6379)\b", lambda m: str(ports[m.group(1)]), text)
        return POD_DNS_NAME.sub(lambda m: addresses[m.group(0)], text)

    env = {"PATH": f"{Path(shutil.which('redis-server')).parent}:/usr/bin:/bin"}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[var["name"]] = PASSWORD
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = pod
        else:  # Kubernetes expands $(VAR) in env values
            env[var["name"]] = local(var["value"].replace("$(POD_NAME)", pod))
    local_dir = {m["mountPath"]: workdir / pod / m["name"] for m in container["volumeMounts"]}
    for directory in local_dir.values():
        directory.mkdir(parents=True, exist_ok=True)
    mount_path = re.compile("|".join(re.escape(m) for m in sorted(local_dir, key=len, reverse=True)))
    config_dir = next(local_dir[m["mountPath"]] for m in container["volumeMounts"] if m["name"] == "config")
    for name, text in _one(SENTINEL, "ConfigMap")["data"].items():
        text = mount_path.sub(lambda m: str(local_dir[m.group(0)]), local(text))
        text = re.sub(r"^bind .*$", f"bind {address}", text, flags=re.MULTILINE)
        # A quicker failover than the manifest's 5 s, for the test's sake.
        text = re.sub(r"down-after-milliseconds (\S+) \d+", r"down-after-milliseconds \1 1000", text)
        (config_dir / name).write_text(text)
    script = mount_path.sub(lambda m: str(local_dir[m.group(0)]), local(container["args"][0]))
    return subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=(workdir / f"{pod}.log").open("a"))


def test_sentinel_manifests_fail_over_and_the_old_primary_rejoins_as_a_replica(tmp_path):
    """Both StatefulSets' start-up scripts and config files, run with real redis-server processes: pod 0 starts as
    the primary and pod 1 as its replica, the sentinels find both and each other; when pod 0 is killed they
    promote pod 1 and the pipeline's URL follows; pod 0, started again, asks the sentinels and rejoins as a
    replica of pod 1."""
    names = [f"cdetr-redis-node-{i}.cdetr-redis-node" for i in range(2)] + \
        [f"cdetr-redis-sentinel-{i}.cdetr-redis-sentinel" for i in range(3)]
    addresses = {name: f"127.0.0.{10 + i}" for i, name in enumerate(names)}  # one loopback address per pod
    ports = {"6379": _free_port(), "26379": _free_port()}
    node_address = [addresses[n] for n in names[:2]]
    pods = {("cdetr-redis-node", i): _start_pod("cdetr-redis-node", i, tmp_path, addresses, ports) for i in range(2)}
    pods.update({("cdetr-redis-sentinel", i): _start_pod("cdetr-redis-sentinel", i, tmp_path, addresses, ports)
                 for i in range(3)})
    sentinels = [redis.Redis(addresses[n], ports["26379"], password=PASSWORD, decode_responses=True,
                             socket_timeout=2) for n in names[2:]]

    def primary() -> str | None:
        answers = {tuple(s.sentinel_get_master_addr_by_name("cdetr") or ()) for s in sentinels}
        return answers.pop()[0] if len(answers) == 1 else None  # only when every sentinel agrees

    def node(i: int) -> redis.Redis:
        return redis.Redis(node_address[i], ports["6379"], password=PASSWORD, decode_responses=True)

    def ready() -> bool:
        try:
            return all(s.sentinel_master("cdetr")["num-other-sentinels"] == 2 and
                       [r["master-link-status"] for r in s.sentinel_slaves("cdetr")] == ["ok"] for s in sentinels)
        except redis.ConnectionError:
            return False

    def wait(condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            dead = [pod for pod, process in pods.items() if process.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"waiting for {what}; dead: {dead}; logs in {tmp_path}"
            time.sleep(0.2)

    try:
        wait(ready, "the sentinels to see the replica and each other")
        assert primary() == node_address[0]
        url = SENTINEL_URL.search(SENTINEL.read_text()).group(0).replace("<password>", PASSWORD)
        client = connect(POD_DNS_NAME.sub(lambda m: addresses[m.group(0)], url).replace("26379", str(ports["26379"])))
        key = frames_key(DEFAULT_PREFIX, "cam1")
        client.xadd(key, {"type": "frame", "json": "{}"}, id="1-0")
        # Replication is asynchronous: kill pod 0 only once pod 1 has the entry, or the promoted node may lack it.
        wait(lambda: node(1).xlen(key) == 1, "pod 1 to replicate the first entry")

        pods.pop(("cdetr-redis-node", 0)).kill()
        wait(lambda: primary() == node_address[1], "the sentinels to promote pod 1")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.xadd(key, {"type": "frame", "json": "{}"}, id="2-0")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the client did not follow the failover"
                time.sleep(0.1)
        assert node(1).info("replication")["role"] == "master"

        pods["cdetr-redis-node", 0] = _start_pod("cdetr-redis-node", 0, tmp_path, addresses, ports)
        wait(lambda: _replicates(node(0), node_address[1]), "pod 0 to rejoin as a replica of pod 1")
        assert [entry_id for entry_id, _ in node(0).xrange(key)] == ["1-0", "2-0"]
    finally:
        for process in pods.values():
            process.kill()
            process.wait()


def _replicates(client: redis.Redis, primary: str) -> bool:
    try:
        info = client.info("replication")
    except redis.ConnectionError:
        return False
    return info["role"] == "slave" and info["master_host"] == primary and info["master_link_status"] == "up"


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
