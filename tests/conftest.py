"""Shared fixtures: a real redis-server on a free loopback port, one local Ray per session, an HTTP server, and a
tiny random-weights detector saved with `save_pretrained`. Plain helpers live in helpers.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_MODEL_SIZE, free_port, wait_for
from pipeline.redis_server import is_listening, start_redis_server

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray cluster needs no auth tokens
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> dict:
    """A redis-server on a free loopback port, in memory only: {"url", "port"}."""
    port = free_port()
    process = start_redis_server(port, tmp_path_factory.mktemp("redis"))
    yield {"url": f"redis://127.0.0.1:{port}/0", "port": port}
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_client(redis_server):
    from pipeline.sink import connect

    return connect(redis_server["url"])


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from model.training.random_model import save_random_tiny_model

    return save_random_tiny_model(tmp_path_factory.mktemp("tiny-model"), TINY_MODEL_SIZE)


@pytest.fixture(scope="session")
def tiny_panoptic_model(tmp_path_factory) -> Path:
    from model.training.random_model import save_random_tiny_model

    return save_random_tiny_model(tmp_path_factory.mktemp("tiny-panoptic"), TINY_MODEL_SIZE, panoptic=True)


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """`python -m http.server` serving a directory on loopback: {"dir", "url"}."""
    directory = tmp_path_factory.mktemp("http")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: is_listening("127.0.0.1", port), 10, "http.server to listen", 0.05)
    yield {"dir": directory, "url": f"http://127.0.0.1:{port}"}
    process.terminate()
    process.wait(timeout=10)
