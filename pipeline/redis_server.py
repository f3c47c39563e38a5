"""The embedded default: with no Redis URL and nothing listening on the default port, start a local redis-server.

The embedded server is daemonized so that results outlive `cdetr run` (for `cdetr subscribe` / `cdetr render`
afterwards); it keeps data in memory only (`--save '' --appendonly no`). Stop it with
`redis-cli -p 6379 shutdown nosave`.
"""
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6379


def is_listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def start_redis_server(port: int, workdir: Path, daemonize: bool = False, extra: Sequence[str] = ()
                       ) -> subprocess.Popen:
    """Start `redis-server` on 127.0.0.1:`port` and wait until it accepts connections; `extra` options override
    the defaults (e.g. `--appendonly yes`, or `--port 0 --tls-port <port> ...` to accept TLS only)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server, or `make system-deps`)")
    workdir.mkdir(parents=True, exist_ok=True)
    command = [binary, "--port", str(port), "--bind", DEFAULT_HOST, "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
               "--daemonize", "yes" if daemonize else "no", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not is_listening(DEFAULT_HOST, port):
        if time.monotonic() > deadline or (not daemonize and process.poll() is not None):
            process.kill()
            raise RuntimeError(f"redis-server did not start on port {port}; see {workdir / 'redis.log'}")
        time.sleep(0.05)
    return process


def resolve_redis_url(url: str | None) -> str:
    """`url` itself, or the default local server, started here (and logged) if it is not running."""
    if url is not None:
        return url
    default = f"redis://{DEFAULT_HOST}:{DEFAULT_PORT}/0"
    if not is_listening(DEFAULT_HOST, DEFAULT_PORT):
        workdir = Path(tempfile.gettempdir()) / "cdetr-redis"
        start_redis_server(DEFAULT_PORT, workdir, daemonize=True)
        logger.info("started an embedded redis-server at %s (in-memory; log %s; stop it with `redis-cli -p %d "
                    "shutdown nosave`)", default, workdir / "redis.log", DEFAULT_PORT)
    return default
