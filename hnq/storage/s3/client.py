"""The process's shared, fork-safe boto3 session and S3 client, and their settings.

The client comes from boto3's standard credential chain (env, profile, web identity, container /
instance metadata) and honours ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` itself (boto3 >=
1.28). Our own tunables are the ``HARDNET_S3_*`` fields of :class:`hnq.settings.S3Settings`
(retry mode, attempts, timeouts, addressing style), read through :func:`s3_settings`.

Every S3 call goes through this session: GETs (:mod:`hnq.storage.s3.get`, and obstore's
credentials in :mod:`hnq.storage.s3.get_obstore`), listing (:mod:`hnq.storage.s3.listing`),
writes (:mod:`hnq.storage.s3.destination`), tags and inventory reports. What is built from it and
cached elsewhere registers with :func:`on_reset`, so :func:`reset_s3_client` drops it too.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

from typing import TYPE_CHECKING

from hnq.settings import S3Settings

if TYPE_CHECKING:
    import boto3
    from botocore.config import Config

# boto3 itself is imported when the first client or session is made, not with this module: every
# `hardnet` command imports the storage layer, and boto3 + botocore.config cost about 0.5 s of CPU
# at start-up that `status`, `wait`, `cancel` and a local-file job never use.

# boto3's own variables that shape the client, and ours (every S3Settings field)
_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
    *(f"HARDNET_S3_{name.upper()}" for name in S3Settings.model_fields),
)
_lock = threading.Lock()
_clients: dict[tuple, object] = {}
_pid = os.getpid()
#: called by reset_s3_client(): caches built from the session elsewhere (obstore's stores)
_reset_hooks: list[Callable[[], None]] = []

_session: boto3.session.Session | None = None


def _reset_after_fork() -> None:
    global _lock, _clients, _pid, _session
    _lock = threading.Lock()
    _clients = {}
    _session = None
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


_settings_cache: tuple[tuple, S3Settings] | None = None


def s3_settings() -> S3Settings:
    """The HARDNET_S3_* settings (read through their pydantic class; re-read when the
    environment changed, as the client is). A bad value raises a ConfigError naming it."""
    global _settings_cache
    key = env_key()
    cached = _settings_cache
    if cached is None or cached[0] != key:
        cached = _settings_cache = (key, S3Settings())
    return cached[1]


def client_config() -> Config:
    from botocore.config import Config

    st = s3_settings()
    s3_cfg = {"addressing_style": st.addressing_style} if st.addressing_style else {}
    return Config(
        # total_max_attempts counts the first try too (like AWS_MAX_ATTEMPTS); botocore's
        # ``max_attempts`` key would count retries only (8 -> 9 requests).
        retries={"mode": st.retry_mode, "total_max_attempts": st.max_attempts},
        connect_timeout=st.connect_timeout,
        read_timeout=st.read_timeout,
        max_pool_connections=256,  # the engine keeps up to 256 GETs in flight on a GPU
        s3=s3_cfg or None,
    )


def env_key() -> tuple:
    """The environment variables the client depends on (a change means a new client)."""
    return tuple(os.environ.get(k) for k in _ENV_KEYS)


def boto3_session() -> boto3.session.Session:
    """The process's boto3 session (its credential chain is what every S3 call uses)."""
    global _session
    s3_client()  # creates the session (and drops a stale one after a fork)
    session = _session
    if session is None:  # reset concurrently: make one of our own
        import boto3

        with _lock:
            if _session is None:
                _session = boto3.session.Session()
            session = _session
    return session


def s3_client():
    """The process's shared S3 client (thread-safe; recreated in a forked child and when one of
    the endpoint / region / HARDNET_S3_* variables changed)."""
    global _pid, _session
    key = env_key()
    if os.getpid() != _pid:  # forked without register_at_fork having run (or pid faked)
        with _lock:
            if os.getpid() != _pid:
                _clients.clear()
                _session = None
                _pid = os.getpid()
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                # One session per process (it caches the loaded service model: a client from a
                # fresh session costs ~1 s of CPU); a new client when the environment changed.
                if _session is None:
                    import boto3

                    _session = boto3.session.Session()
                client = _session.client("s3", config=client_config())
                _clients.clear()  # the environment changed: drop the stale client
                _clients[key] = client
    return client


def on_reset(hook: Callable[[], None]) -> None:
    """Have :func:`reset_s3_client` call ``hook`` (a module that caches something built from the
    session registers its own reset, so this module need not know it)."""
    _reset_hooks.append(hook)


def reset_s3_client() -> None:
    """Forget the cached client and session, and the obstore stores (tests; after changing
    credentials)."""
    global _session
    with _lock:
        _clients.clear()
        _session = None
    for hook in _reset_hooks:
        hook()
