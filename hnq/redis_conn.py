"""One Redis client from ``HARDNET_BROKER_URL``: a plain ``redis://`` / ``rediss://`` URL, or
kombu's Sentinel syntax ``sentinel://[USER:PASSWORD@]H1:26379[/DB];sentinel://H2:26379;...`` with
the master's name (``HARDNET_SENTINEL_MASTER``). The job store, the CLI, the exporter and the
sweeper all connect through :func:`client`; Celery gets the same Sentinel through
:func:`celery_sentinel_options`, so both read one URL the same way.

What the URL means under Sentinel is kombu's reading (kombu/transport/redis.py, SentinelChannel):
every ``sentinel://`` part names one sentinel; the user, password and database of the FIRST part
are the master's (the Redis that holds the data), not the sentinels'. A password for the sentinels
themselves (``requirepass`` in sentinel.conf) is ``HARDNET_SENTINEL_PASSWORD`` (kombu's
``sentinel_kwargs``). ``HARDNET_SENTINEL_TLS``: TLS to the master and to the sentinels, with the
system's CA certificates (``SSL_CERT_FILE`` for another bundle).

The client is redis-py's ``Sentinel(...).master_for(name)``: each new connection asks the sentinels
where the master is, and a connection to a master that was demoted (ReadOnlyError, or the
"UNBLOCKED" of a blocked command) is closed and raised as a ConnectionError, so a retry policy on
ConnectionError (the job store's) reconnects to the new master."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis
from redis.connection import SSLConnection
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelOptions:
    """How to reach the master behind a ``sentinel://`` URL (HARDNET_SENTINEL_*)."""
    master: str
    password: str | None = None
    tls: bool = False


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://...;sentinel://...`` URL: the sentinels, and the master's
    credentials and database (from the first part, as kombu reads them)."""
    nodes: list[tuple[str, int]]
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel(url: str) -> SentinelURL:
    """Raise ValueError (a message fit for the user, without the password) on a bad URL."""
    nodes, first = [], None
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        u = urlsplit(part)
        if u.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(f"every part of a Sentinel URL must be sentinel://HOST:PORT, not {u.scheme}://")
        try:
            port = u.port or SENTINEL_PORT
        except ValueError:
            raise ValueError("a sentinel's port is not a number") from None
        if not u.hostname:
            raise ValueError("a sentinel without a host: give sentinel://HOST:26379")
        nodes.append((u.hostname, port))
        first = first or u
    if not nodes:
        raise ValueError("no sentinel: give sentinel://HOST:26379;sentinel://HOST2:26379")
    db = first.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number: give sentinel://HOST:26379/DB, e.g. /0")
    return SentinelURL(nodes=nodes, db=int(db or 0),
                       username=unquote(first.username) if first.username else None,
                       password=unquote(first.password) if first.password else None)


def _sentinel_kwargs(opts: SentinelOptions, **kw) -> dict:
    """Connection arguments for the sentinels themselves: short timeouts (a sentinel that does not
    answer is skipped for the next one), their own password, TLS."""
    out = {"socket_timeout": min(float(kw.get("socket_timeout") or 3), 3.0),
           "socket_connect_timeout": min(float(kw.get("socket_connect_timeout") or 2), 2.0)}
    if opts.password:
        out["password"] = opts.password
    if opts.tls:
        out["ssl"] = True
    return out


class FollowingConnection(SentinelManagedConnection):
    """redis-py's connection to a Sentinel's master that asks the sentinels again before EVERY
    connect, and tries the socket once per attempt (the client's retry policy makes the attempts).

    redis-py (8.2) re-asks the sentinels only in ``connect()``; a command's own retry reconnects
    through ``connect_check_health()``, which keeps the address of the master it had and retries the
    socket itself with the whole policy (redis/redis-py#3874): after the master was SIGKILLed, a
    `submit --wait` whose BLPOP was on it tried the dead address for the job store's ~3 minutes of
    backoff while the sentinels had promoted the replica within seconds (seen in
    tests/integration/test_sentinel.py: the job done 6 s after the kill, the CLI 210 s later)."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
        if self._sock:
            return
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=False)


class FollowingSSLConnection(FollowingConnection, SSLConnection):
    """:class:`FollowingConnection` over TLS (HARDNET_SENTINEL_TLS)."""


def client(url: str, sentinel: SentinelOptions | None = None, **kwargs) -> redis.Redis:
    """A redis-py client for ``url``; ``kwargs`` are connection arguments (decode_responses,
    timeouts, retry, ...). A ``sentinel://`` URL needs ``sentinel`` (ValueError otherwise)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    if sentinel is None or not sentinel.master:
        raise ValueError("a sentinel:// broker URL needs HARDNET_SENTINEL_MASTER (the master's name)")
    su = parse_sentinel(url)
    conn = dict(kwargs, db=su.db)
    if su.username:
        conn["username"] = su.username
    if su.password:
        conn["password"] = su.password
    sent = Sentinel(su.nodes, sentinel_kwargs=_sentinel_kwargs(sentinel, **kwargs), **conn)
    return sent.master_for(sentinel.master,
                           connection_class=FollowingSSLConnection if sentinel.tls else FollowingConnection)


def same_master(c: redis.Redis, **overrides) -> redis.Redis:
    """Another client to the same Redis as ``c`` (plain or Sentinel) with some connection
    arguments changed (e.g. ``decode_responses=False``); it has its own connection pool."""
    pool = c.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return pool.sentinel_manager.master_for(pool.service_name, connection_class=pool.connection_class,
                                                **overrides)
    return redis.Redis(connection_pool=redis.ConnectionPool(
        **{**pool.connection_kwargs, **overrides}, connection_class=pool.connection_class))


def celery_sentinel_options(url: str, sentinel: SentinelOptions | None) -> dict:
    """The Celery settings a ``sentinel://`` broker needs beyond the URL: the transport options
    ``master_name`` and ``sentinel_kwargs`` (kombu's SentinelChannel), and ``broker_use_ssl`` for
    TLS to the master. Empty for a plain Redis URL."""
    if not is_sentinel(url):
        return {}
    if sentinel is None or not sentinel.master:
        raise ValueError("a sentinel:// broker URL needs HARDNET_SENTINEL_MASTER (the master's name)")
    out: dict = {"transport_options": {"master_name": sentinel.master,
                                       "sentinel_kwargs": _sentinel_kwargs(sentinel)}}
    if sentinel.tls:
        import ssl
        out["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return out
