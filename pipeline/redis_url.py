"""The Redis URLs cdetr accepts, and the client each one gets.

`redis://`, `rediss://` (TLS) and `unix://` name one server and go to redis-py as they are. A Sentinel deployment
is named by its sentinels and the service they watch:

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<service>[/<db>][?option=value&...]

`rediss+sentinel://` speaks TLS to the sentinels and to the data nodes. The port defaults to 26379, the db to 0;
query options are redis-py's connection options, as in `rediss://` URLs (`ssl_ca_certs=/path/ca.pem`). The one
user and password authenticate to the sentinels and to the data nodes alike, so sentinels that require a password
must require the same one (deploy/redis-sentinel/ sets it up that way): a sentinel that anyone on the network can
reach can be told to fail over, or to monitor another server. docs/wire-format.md, Connecting, has the details.
"""
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.connection import parse_url
from redis.sentinel import Sentinel

SERVER_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]  # (host, port) of each sentinel
    service: str  # the name the sentinels monitor the primary under (`sentinel monitor <service> ...`)
    options: dict[str, Any]  # redis-py connection options: db, username, password, ssl and ssl_* ...


def check_redis_url(url: str) -> None:
    """Raise ValueError unless `url` is one of the forms above (a Sentinel URL is parsed in full)."""
    scheme = url.partition("://")[0]
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
    elif scheme not in SERVER_SCHEMES or "://" not in url:
        raise ValueError(f"must start with {', '.join(s + '://' for s in SERVER_SCHEMES + SENTINEL_SCHEMES)}")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a `redis+sentinel://` or `rediss+sentinel://` URL; ValueError saying what is wrong otherwise
    (never quoting the password)."""
    scheme, _, rest = url.partition("://")
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (expected {' or '.join(s + '://' for s in SENTINEL_SCHEMES)})")
    location, _, query = rest.partition("?")
    netloc, _, path = location.partition("/")
    user_info, _, hosts = netloc.rpartition("@")
    sentinels = [_host_port(host) for host in hosts.split(",")]
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("a Sentinel URL names the service after the hosts: redis+sentinel://host:26379/<service>")
    # redis-py parses the rest (user, password, db, query options) as it would for one server's URL.
    tls = scheme == "rediss+sentinel"
    options = parse_url(f"{'rediss' if tls else 'redis'}://{user_info}{'@' if user_info else ''}sentinel/{db}"
                        f"?{query}")
    for key in ("host", "port", "connection_class"):
        options.pop(key, None)
    if db and "db" not in options:
        raise ValueError(f"the database after the service name must be a number, not {db!r}")
    return SentinelUrl(sentinels, service, {**options, "ssl": True} if tls else options)


def _host_port(host: str) -> tuple[str, int]:
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port or SENTINEL_PORT
    except ValueError:
        raise ValueError(f"bad sentinel port in {host!r}") from None
    if not parts.hostname:
        raise ValueError("every sentinel needs a host: redis+sentinel://host1:26379,host2:26379/<service>")
    return parts.hostname, port


def client_for(url: str, **options: Any) -> redis.Redis:
    """A client for `url`. For a Sentinel URL it asks the sentinels where the primary is on every new
    connection, so after a failover it reconnects to the promoted replica (until then its commands fail with
    ConnectionError, MasterNotFoundError included, which the sink retries)."""
    if url.partition("://")[0] not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    node_options = {**parsed.options, **options}
    # The sentinels get the same credentials and TLS settings, no database (they have none), and a reply timeout:
    # a sentinel that stops answering must not stall the search for the primary, the next one is asked.
    sentinel_options = {"socket_timeout": 5, **{key: value for key, value in node_options.items() if key != "db"}}
    return Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_options).master_for(parsed.service, **node_options)
