"""S3 object GETs through obstore (Rust ``object_store``), with boto3's semantics.

Why: it costs less client CPU per object than boto3 (figures:
docs/performance.md#s3-get-client). :func:`hnq.storage.s3.get.fetch_s3` uses it when
``FetchPolicy.s3_client`` is ``auto`` (and obstore is installed) or ``obstore``; listing and
writes stay on boto3.

What is kept from the boto3 path:

* **Credentials**: boto3's chain, from the same session as :func:`hnq.storage.s3.client.s3_client`
  (env, profiles, SSO, web identity, container and instance roles). obstore asks
  :class:`BotoCredentialProvider` for them and keeps the answer for :data:`CREDENTIALS_TTL`
  (5 min); each call takes ``get_frozen_credentials()``, so botocore refreshes expiring
  credentials itself, as it does for boto3 (it never hands out credentials that expire within
  10 minutes, so what obstore holds is always valid).
* **Endpoint, region, addressing style**: the boto3 client's own resolution
  (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, profile, region, ``HARDNET_S3_ADDRESSING_STYLE``):
  its ``endpoint_url`` and region, and path or virtual-hosted style as boto3 would address this
  bucket (read from a GET URL that boto3 presigns locally, no request). An ``http://`` endpoint
  turns on obstore's ``allow_http``.
* **Retry budget**: ``HARDNET_S3_MAX_ATTEMPTS`` requests in all (obstore's ``max_retries`` = N - 1),
  exponential backoff with jitter from :data:`BACKOFF_INIT` up to :data:`BACKOFF_MAX`. obstore
  retries 5xx and 429 answers, connection errors, timeouts and a body that breaks off mid-stream
  (it resumes the read), all within that budget. ``HARDNET_S3_RETRY_MODE=adaptive`` (boto3's
  client-side rate limiter) has no obstore counterpart: set ``HARDNET_S3_GET_CLIENT=boto3`` to
  keep it.
* **Timeouts**: ``HARDNET_S3_CONNECT_TIMEOUT`` (10 s) to connect, ``HARDNET_S3_READ_TIMEOUT``
  (60 s) per read, and 10x the read timeout for a whole request (obstore has an overall request
  timeout, boto3 has none; its default of 30 s would cut large objects on slow links).
* **Size cap**: ``policy.max_bytes`` is checked on the announced size (``Content-Length``) before
  the body is read; a longer body cannot arrive (the HTTP layer stops at ``Content-Length``) and
  the stream is cut after ``max_bytes + 1`` bytes all the same.
* **Error mapping**: obstore's exceptions carry the HTTP status and S3's XML error body in their
  message; status and ``<Code>`` are read from it and go through the same
  :func:`hnq.storage.s3.errors.classify_s3_error` as boto3's ClientError (not_found,
  access_denied, invalid_uri, coded TransientError...). Transport failures that outlived the retries ->
  TransientError ``timeout`` or ``fetch_error``; a failing credential provider -> TransientError
  ``fetch_error``.
* **Keys**: obstore paths cannot spell every S3 key (it strips a leading or trailing ``/``,
  refuses ``//``, ``.`` / ``..`` segments and control characters): :func:`can_address` is False
  for those and boto3 fetches them.

One store per bucket per process, shared by all threads, rebuilt when one of the variables that
:func:`hnq.storage.s3.client.s3_client` watches changes, and dropped in a forked child. obstore's tokio
runtime does not survive a fork: in a child forked after the parent made an obstore request, a
request hangs. :func:`usable_here` is False there, and boto3 GETs the objects of such a child
(a worker pool forked before any fetch, or exec'd, is not affected).
"""
from __future__ import annotations

import logging
import os
import re
import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import botocore.exceptions as bex
import obstore
from obstore.exceptions import (BaseError as ObstoreError, InvalidPathError,
                                PermissionDeniedError, UnauthenticatedError)
from obstore.store import S3Store

from hnq.errors import ErrorCode, ImageError, TransientError
from hnq.storage.base import Fetched, FetchPolicy, clean_etag, too_large
from hnq.storage.s3.client import boto3_session, env_key, on_reset, s3_client, s3_settings
from hnq.storage.s3.errors import classify_s3_error, map_fetch_error

log = logging.getLogger(__name__)

#: how long obstore keeps credentials before asking the provider again
CREDENTIALS_TTL = timedelta(minutes=5)
#: first and longest wait between two attempts (obstore: exponential, base 2, with jitter)
BACKOFF_INIT = timedelta(milliseconds=200)
BACKOFF_MAX = timedelta(seconds=20)
#: no retry starts later than this after the first request
RETRY_TIMEOUT = timedelta(minutes=5)
#: body chunks handed over from Rust
_CHUNK = 1 << 20

_lock = threading.Lock()
_stores: dict[str, S3Store] = {}
_stores_env: tuple | None = None
_pid = os.getpid()
#: pid of the process whose obstore request started obstore's runtime (None: not started)
_runtime_pid: int | None = None
_warned_fork = False

_STATUS_RE = re.compile(r"status code: (\d{3})\b")
_CODE_RE = re.compile(r"<Code>([^<]{1,128})</Code>")
_TIMEOUT_RE = re.compile(r"kind: Timeout|TimedOut|timed out|deadline has elapsed", re.I)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _reset_after_fork() -> None:
    global _lock, _stores, _stores_env, _pid
    _lock = threading.Lock()
    _stores = {}
    _stores_env = None
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def usable_here() -> bool:
    """False in a process forked after its parent had made an obstore request (it would hang)."""
    global _warned_fork
    if _runtime_pid is None or _runtime_pid == os.getpid():
        return True
    if not _warned_fork:
        _warned_fork = True
        log.warning("this process was forked after obstore had started in its parent; S3 GETs "
                    "use boto3 here (start workers before fetching, or exec them)")
    return False


def can_address(key: str) -> bool:
    """Whether an obstore path names exactly this S3 key."""
    if not key or key.startswith("/") or key.endswith("/") or "//" in key:
        return False
    if _CONTROL_RE.search(key):
        return False
    return not any(seg in (".", "..") for seg in key.split("/"))


class BotoCredentialProvider:
    """Credentials for obstore from a boto3 session's credential chain (see the module doc)."""

    def __init__(self, session):
        self._session = session
        self._creds = None
        self._lock = threading.Lock()

    def _credentials(self):
        with self._lock:
            if self._creds is None:
                creds = self._session.get_credentials()
                if creds is None:
                    raise bex.NoCredentialsError()
                self._creds = creds
            return self._creds

    def __call__(self) -> dict:
        frozen = self._credentials().get_frozen_credentials()
        if not frozen.access_key or not frozen.secret_key:
            raise bex.PartialCredentialsError(provider="boto3", cred_var="secret_key")
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token or None,
                "expires_at": datetime.now(timezone.utc) + CREDENTIALS_TTL}


def retry_config() -> dict:
    attempts = s3_settings().max_attempts
    return {"max_retries": max(0, attempts - 1), "retry_timeout": RETRY_TIMEOUT,
            "backoff": {"init_backoff": BACKOFF_INIT, "max_backoff": BACKOFF_MAX, "base": 2}}


def client_options(endpoint: str) -> dict:
    st = s3_settings()
    read = st.read_timeout
    return {"connect_timeout": timedelta(seconds=st.connect_timeout),
            "read_timeout": timedelta(seconds=read), "timeout": timedelta(seconds=10 * read),
            "allow_http": urlsplit(endpoint).scheme.lower() == "http"}


def endpoint_for(client, bucket: str) -> tuple[str, bool]:
    """(endpoint, virtual-hosted?) as boto3 addresses ``bucket``; for virtual-hosted style the
    endpoint includes the bucket, as obstore wants it."""
    base = client.meta.endpoint_url
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"},
                                        ExpiresIn=60)
    path = urlsplit(url).path
    base_path = urlsplit(base).path.rstrip("/")
    if path.startswith(f"{base_path}/{bucket}/"):
        return base.rstrip("/"), False
    b = urlsplit(base)
    return urlunsplit(b._replace(netloc=f"{bucket}.{b.netloc}")).rstrip("/"), True


def _build(bucket: str) -> S3Store:
    client = s3_client()
    endpoint, virtual = endpoint_for(client, bucket)
    return S3Store(
        bucket,
        config={"endpoint": endpoint, "region": client.meta.region_name or "us-east-1",
                "virtual_hosted_style_request": virtual},
        client_options=client_options(endpoint), retry_config=retry_config(),
        credential_provider=BotoCredentialProvider(boto3_session()))


def store_for(bucket: str) -> S3Store:
    """The process's store for ``bucket`` (thread-safe; rebuilt when the environment changed)."""
    global _stores_env, _pid
    env = (env_key(), BACKOFF_INIT, BACKOFF_MAX, RETRY_TIMEOUT, CREDENTIALS_TTL)
    if os.getpid() != _pid:  # forked without register_at_fork having run (or pid faked)
        _reset_after_fork()
    store = _stores.get(bucket) if env == _stores_env else None
    if store is None:
        with _lock:
            if env != _stores_env:
                _stores.clear()
                _stores_env = env
            store = _stores.get(bucket)
            if store is None:
                store = _stores[bucket] = _build(bucket)
    return store


def reset_stores() -> None:
    global _stores_env
    with _lock:
        _stores.clear()
        _stores_env = None


on_reset(reset_stores)  # new credentials: reset_s3_client() drops the stores built from the old


def _first_line(e: BaseException, key: str) -> str:
    text = str(e).replace(key, "<key>") if key else str(e)
    line = text.split("\n\nDebug source:", 1)[0].strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {line[:300]}"


def map_obstore_error(e: BaseException, uri: str, key: str) -> Exception:
    """The ImageError / TransientError for an exception of an obstore GET of ``key`` (``uri``)."""
    if not isinstance(e, (ObstoreError, OSError)):
        return ImageError(f"{uri}: {type(e).__name__}: {e}", ErrorCode.internal_error)
    # the key is in the message (raw, and within the URL): out of the way of the parsing
    text = str(e).replace(key, "<key>") if key else str(e)
    status = _STATUS_RE.search(text)
    if status:
        code = _CODE_RE.search(text)
        return classify_s3_error(uri, code.group(1).strip() if code else "",
                                     int(status.group(1)))
    if isinstance(e, UnauthenticatedError):  # the credential provider failed: no answer at all
        return TransientError(f"{uri}: no usable AWS credentials ({_first_line(e, key)})",
                              ErrorCode.fetch_error)
    if isinstance(e, FileNotFoundError):
        return classify_s3_error(uri, "", 404)
    if isinstance(e, PermissionDeniedError):
        return classify_s3_error(uri, "", 403)
    if isinstance(e, InvalidPathError):
        return ImageError(f"{uri}: {_first_line(e, key)}", ErrorCode.invalid_uri)
    code = ErrorCode.timeout if _TIMEOUT_RE.search(text) else ErrorCode.fetch_error
    return TransientError(f"{uri}: S3 transport error after retries ({_first_line(e, key)})", code)


def fetch_obstore(uri: str, bucket: str, key: str, policy: FetchPolicy,
                  on_size=None) -> Fetched | None:
    """The object, or None when obstore cannot address ``key`` (the caller uses boto3).
    ``on_size(n | None)`` is called with the announced size before the body is streamed."""
    global _runtime_pid
    try:
        store = store_for(bucket)
    except Exception as e:  # noqa: BLE001 - no credentials for the presign, bad endpoint...
        raise map_fetch_error(e, uri) from None
    if _runtime_pid is None:
        _runtime_pid = os.getpid()
    try:
        res = obstore.get(store, key)
        size = res.meta["size"]
        if size is not None and size > policy.max_bytes:
            raise too_large(uri, size, policy.max_bytes)
        if on_size is not None:
            on_size(size)
        parts: list[bytes] = []
        total = 0
        for chunk in res.stream(min_chunk_size=min(_CHUNK, policy.max_bytes + 1)):
            parts.append(chunk)
            total += len(chunk)
            if total > policy.max_bytes:
                raise too_large(uri, None, policy.max_bytes)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
    except ImageError:
        raise
    except ValueError as e:
        if isinstance(e, ObstoreError) or "parse path" not in str(e):
            raise map_obstore_error(e, uri, key) from None
        log.debug("obstore cannot address %r (%s); using boto3", key, e)
        return None
    except Exception as e:  # noqa: BLE001 - mapped below
        raise map_obstore_error(e, uri, key) from None
    return Fetched(data=bytes(data), etag=clean_etag(res.meta.get("e_tag")), size=len(data))
