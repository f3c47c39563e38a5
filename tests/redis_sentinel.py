"""A Redis Sentinel deployment on loopback for the tests: a primary, one replica and three sentinels, each a real
redis-server process on a free port, all behind one password (the data nodes' `requirepass` and `masterauth`, the
sentinels' `requirepass` and `sentinel auth-pass`: what `redis+sentinel://` URLs expect, docs/wire-format.md),
optionally speaking only TLS, among themselves too."""
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from helpers import free_port, wait_for
from pipeline.redis_server import DEFAULT_HOST, is_listening, start_redis_server

SERVICE = "cdetr"
PASSWORD = "sentinel-test-0123456789abcdef"
QUORUM = 2  # of three sentinels: a failover needs two to agree the primary is down, and a majority to vote
DOWN_AFTER_MS = 1000  # how long the primary must not answer before a sentinel calls it down


@dataclass(frozen=True)
class Tls:
    cert: Path  # the servers' certificate and key (every process shares them)
    key: Path
    ca: Path  # the CA that signed them

    def settings(self, port: int) -> list[tuple[str, str]]:
        """TLS only on `port` (port 0 turns the plain one off), to clients and between the servers."""
        return [("port", "0"), ("tls-port", str(port)), ("tls-cert-file", str(self.cert)),
                ("tls-key-file", str(self.key)), ("tls-ca-cert-file", str(self.ca)), ("tls-auth-clients", "no"),
                ("tls-replication", "yes")]


@dataclass
class SentinelGroup:
    nodes: dict[int, subprocess.Popen]  # port -> redis-server process (primary and replica)
    sentinels: dict[int, subprocess.Popen]  # port -> sentinel process
    tls: Tls | None = None
    killed: list[int] = field(default_factory=list)  # ports of the nodes killed so far

    @property
    def url(self) -> str:
        hosts = ",".join(f"{DEFAULT_HOST}:{port}" for port in self.sentinels)
        if self.tls:
            return f"rediss+sentinel://:{PASSWORD}@{hosts}/{SERVICE}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{SERVICE}/0"

    def client(self, port: int) -> redis.Redis:
        """A client of one data node or sentinel, by port."""
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls else {}
        return redis.Redis(DEFAULT_HOST, port, password=PASSWORD, decode_responses=True, socket_timeout=2, **tls)

    def primary_port(self) -> int:
        """The primary's port, as the first sentinel answering sees it."""
        for port in self.sentinels:
            try:
                return int(self.client(port).sentinel_get_master_addr_by_name(SERVICE)[1])
            except redis.ConnectionError:
                continue
        raise RuntimeError("no sentinel answers")

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown, nothing flushed to its replica); its port."""
        port = self.primary_port()
        self.nodes[port].kill()
        self.nodes[port].wait()
        self.killed.append(port)
        return port

    def wait_for_failover(self, timeout: float = 60) -> int:
        """Wait until every sentinel names a live node as the primary; its port."""
        def promoted() -> bool:
            ports = {int(self.client(p).sentinel_get_master_addr_by_name(SERVICE)[1]) for p in self.sentinels}
            return len(ports) == 1 and not ports & set(self.killed)

        wait_for(promoted, timeout, "the sentinels to promote the replica", 0.1)
        return self.primary_port()

    def stop(self) -> None:
        for process in [*self.sentinels.values(), *self.nodes.values()]:
            process.kill()
            process.wait()


def start_sentinel_group(workdir: Path, tls: Tls | None = None) -> SentinelGroup:
    """Start the primary, its replica and three sentinels; return once every sentinel sees the replica and the
    two other sentinels (before that, a failover could not be agreed on)."""
    def flags(port: int) -> list[str]:
        return [arg for name, value in (tls.settings(port) if tls else []) for arg in (f"--{name}", value)]

    primary_port, replica_port = free_port(), free_port()
    auth = ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
    nodes = {primary_port: start_redis_server(primary_port, workdir / "primary", extra=auth + flags(primary_port))}
    nodes[replica_port] = start_redis_server(
        replica_port, workdir / "replica", extra=[*auth, "--replicaof", DEFAULT_HOST, str(primary_port),
                                                  *flags(replica_port)])
    group = SentinelGroup(nodes, {}, tls)
    try:
        for i in range(3):
            port = free_port()
            group.sentinels[port] = _start_sentinel(port, workdir / f"sentinel-{i}", primary_port, tls)
        wait_for(lambda: all(_sees_the_group(group.client(p)) for p in group.sentinels), 60,
                 "the sentinels to see the replica and each other", 0.2)
    except BaseException:
        group.stop()
        raise
    return group


def _start_sentinel(port: int, workdir: Path, primary_port: int, tls: Tls | None) -> subprocess.Popen:
    workdir.mkdir(parents=True)
    config = workdir / "sentinel.conf"  # a sentinel rewrites its config file with what it learns: one each
    listen = [f"{name} {value}" for name, value in tls.settings(port)] if tls else [f"port {port}"]
    config.write_text("\n".join([
        *listen, f"bind {DEFAULT_HOST}", f"dir {workdir}", f"logfile {workdir / 'sentinel.log'}",
        f"requirepass {PASSWORD}",
        f"sentinel monitor {SERVICE} {DEFAULT_HOST} {primary_port} {QUORUM}",
        f"sentinel auth-pass {SERVICE} {PASSWORD}",
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
        # Also the wait before a failover that stalled is tried again: small, so that one stall costs little.
        f"sentinel failover-timeout {SERVICE} 5000", ""]))
    process = subprocess.Popen([shutil.which("redis-server"), str(config), "--sentinel"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: is_listening(DEFAULT_HOST, port) or process.poll() is not None, 10, "a sentinel to listen", 0.05)
    if process.poll() is not None:
        raise RuntimeError(f"redis-server --sentinel did not start on port {port}; see {workdir / 'sentinel.log'}")
    return process


def _sees_the_group(sentinel: redis.Redis) -> bool:
    replicas = sentinel.sentinel_slaves(SERVICE)
    return (int(sentinel.sentinel_master(SERVICE)["num-other-sentinels"]) == 2 and len(replicas) == 1
            and replicas[0]["master-link-status"] == "ok")  # synced: a replica still loading cannot take over
