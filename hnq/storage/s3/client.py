"""S3 backend: a shared, fork-safe boto3 client, object fetch, listing and the S3 destination.

The client comes from boto3's standard credential chain (env, profile, web identity, container /
instance metadata) and honours ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` itself (boto3 >=
1.28). Our own tunables are the ``HARDNET_S3_*`` fields of :class:`hnq.settings.S3Settings`
(retry mode, attempts, timeouts, addressing style), read through :func:`s3_settings`.

Object GETs go through boto3 or, with ``FetchPolicy.s3_client`` = ``auto`` (obstore when it is
installed) or ``obstore``, through :mod:`hnq.storage.s3.get_obstore`, which keeps these semantics
(same credentials, endpoint, addressing, retry budget, size cap and error mapping). Listing and
writes always use boto3.

Error mapping of a fetch: NoSuchKey/NoSuchBucket/404 -> ``not_found``; InvalidObjectState (an
archived object that was not restored) -> ``archived``; AccessDenied/403 -> ``access_denied``; throttling, 5xx, connection trouble and timeouts that outlive boto's retries ->
:class:`TransientError` (the chunk is retried, the image gets no permanent record) whose code says
which: ``throttled`` (SlowDown, 503, 429, Throttling...), ``timeout`` (connect / read timeouts,
RequestTimeout) or ``fetch_error`` (the rest); credential problems (expired token, unknown key id,
bad signature, none found) -> TransientError ``fetch_error`` too, since they concern every image,
not this one.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Iterator

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from hnq.errors import ConfigError, ErrorCode, ImageError, TransientError
from hnq.settings import S3Settings
from hnq.storage.base import (Destination, Fetched, FetchPolicy, check_relpath, clean_etag,
                              read_capped, too_large)
from hnq.uris import InvalidURI, is_image_name, parse_s3

log = logging.getLogger(__name__)

# boto3's own variables that shape the client, and ours (every S3Settings field)
_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
    *(f"HARDNET_S3_{name.upper()}" for name in S3Settings.model_fields),
)
_lock = threading.Lock()
_clients: dict[tuple, object] = {}
_pid = os.getpid()

#: keys per ListObjectsV2 page (S3's maximum is 1000)
LIST_PAGE_SIZE = 1000

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem", "InvalidObjectState",
           "Forbidden"}
_CREDENTIALS = {"ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                "TokenRefreshRequired", "RequestTimeTooSkewed", "ExpiredTokenException"}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "OperationAborted", "RequestTimeTooSkewed"}
# "slow down" answers: their TransientError gets the code ``throttled``
_THROTTLE_CODES = {"SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException",
                   "RequestLimitExceeded", "TooManyRequests", "RequestThrottled",
                   "ThrottledException", "BandwidthLimitExceeded"}
_THROTTLE_STATUS = {429, 503}
_TIMEOUT_CODES = {"RequestTimeout"}
# failures of the transport itself (after boto's own retries) or while streaming a body
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError, bex.ResponseStreamingError,
    bex.ReadTimeoutError, bex.ConnectTimeoutError, OSError,
)
# the transport errors that are timeouts (TransientError code ``timeout``)
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    bex.ReadTimeoutError, bex.ConnectTimeoutError, socket.timeout, TimeoutError,
)
try:  # urllib3 errors can leak out of StreamingBody.read
    import urllib3.exceptions as _u3

    _TRANSPORT_ERRORS = _TRANSPORT_ERRORS + (_u3.HTTPError,)
    _TIMEOUT_ERRORS = _TIMEOUT_ERRORS + (_u3.TimeoutError,)
except ImportError:  # pragma: no cover
    pass

_BODY_ATTEMPTS = 3


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
                    _session = boto3.session.Session()
                client = _session.client("s3", config=client_config())
                _clients.clear()  # the environment changed: drop the stale client
                _clients[key] = client
    return client


def reset_s3_client() -> None:
    """Forget the cached client and session, and the obstore stores (tests; after changing
    credentials)."""
    global _session
    with _lock:
        _clients.clear()
        _session = None
    obs = sys.modules.get("hnq.storage.s3.get_obstore")
    if obs is not None:
        obs.reset_stores()


def _err(e: bex.ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {}) or {}
    code = str(err.get("Code", "") or "")
    status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(code: str, status: int) -> bool:
    return code in _TRANSIENT_CODES or status >= 500 or status == 429


def transient_code(code: str, status: int) -> ErrorCode:
    """The code of the TransientError for an S3 error answer that outlived the retries."""
    if code in _THROTTLE_CODES or status in _THROTTLE_STATUS:
        return ErrorCode.throttled
    if code in _TIMEOUT_CODES:
        return ErrorCode.timeout
    return ErrorCode.fetch_error


def transport_code(e: BaseException) -> ErrorCode:
    """``timeout`` for a connect / read timeout, else ``fetch_error``."""
    return ErrorCode.timeout if isinstance(e, _TIMEOUT_ERRORS) else ErrorCode.fetch_error


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def classify_s3_error(uri: str, code: str, status: int) -> Exception:
    """The ImageError / TransientError for an S3 error answer (error ``code`` of the XML body, may
    be empty; HTTP ``status``, 0 if unknown) to a GET of ``uri``. Both GET clients use it."""
    if code in _NOT_FOUND or status == 404:
        what = "bucket does not exist" if code == "NoSuchBucket" else "no such object"
        return ImageError(f"{uri}: {what}", ErrorCode.not_found)
    if code in _CREDENTIALS:
        return TransientError(f"{uri}: S3 refused our credentials ({code}); check the worker's "
                              "AWS credentials", ErrorCode.fetch_error)
    if code == "InvalidObjectState":
        return ImageError(f"{uri}: the object is archived (InvalidObjectState: a Glacier / Deep "
                          "Archive object, or an Intelligent-Tiering archive tier); restore it first",
                          ErrorCode.archived)
    if code in _DENIED or status == 403:
        return ImageError(f"{uri}: access denied ({code or status})", ErrorCode.access_denied)
    if code in ("InvalidBucketName", "KeyTooLongError", "InvalidURI"):
        return ImageError(f"{uri}: {code}", ErrorCode.invalid_uri)
    if _is_transient(code, status):
        return TransientError(f"{uri}: S3 kept failing after retries ({code or status})",
                              transient_code(code, status))
    return ImageError(f"{uri}: S3 error {code or status}", ErrorCode.fetch_error)


def map_fetch_error(e: BaseException, uri: str) -> Exception:
    """The ImageError / TransientError for an exception raised while reading ``uri``."""
    if isinstance(e, bex.ClientError):
        code, status = _err(e)
        return classify_s3_error(uri, code, status)
    if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError,
                      bex.CredentialRetrievalError)):
        return TransientError(f"{uri}: no usable AWS credentials ({type(e).__name__})",
                              ErrorCode.fetch_error)
    if isinstance(e, bex.ParamValidationError):
        return ImageError(f"{uri}: {e}", ErrorCode.invalid_uri)
    if isinstance(e, _TRANSPORT_ERRORS) or isinstance(e, bex.BotoCoreError):
        return TransientError(f"{uri}: S3 transport error after retries ({_describe(e)})",
                              transport_code(e))
    return ImageError(f"{uri}: {_describe(e)}", ErrorCode.internal_error)


# ---------------------------------------------------------------- GET client choice

GET_CLIENTS = ("auto", "obstore", "boto3")


_obstore_ok: bool | None = None


def obstore_available() -> bool:
    """Whether obstore can be imported (the answer is remembered)."""
    global _obstore_ok
    if _obstore_ok is None:
        try:
            import hnq.storage.s3.get_obstore  # noqa: F401  (imports obstore)
        except ImportError:
            _obstore_ok = False
        else:
            _obstore_ok = True
    return _obstore_ok


def get_client_for(choice: str) -> str:
    """``obstore`` or ``boto3``: the client that GETs objects under ``FetchPolicy.s3_client``
    (``auto``: obstore when installed and usable in this process; ``obstore``: the same, but a
    missing obstore is a ConfigError; ``boto3``). In a process forked after obstore had started
    its runtime in the parent, obstore cannot work (its threads are gone): boto3 is used."""
    if choice == "boto3":
        return "boto3"
    if choice not in GET_CLIENTS:
        raise ConfigError(f"unknown S3 GET client {choice!r}; use one of {', '.join(GET_CLIENTS)}")
    if not obstore_available():
        if choice == "obstore":
            raise ConfigError("HARDNET_S3_GET_CLIENT=obstore but obstore is not installed "
                              "(pip install 'obstore>=0.12,<0.13')")
        return "boto3"
    from hnq.storage.s3 import get_obstore as s3_obstore

    return "obstore" if s3_obstore.usable_here() else "boto3"


def fetch_s3(uri: str, policy: FetchPolicy) -> Fetched:
    bucket, key = parse_s3(uri)
    if get_client_for(policy.s3_client) == "obstore":
        from hnq.storage.s3 import get_obstore as s3_obstore

        if s3_obstore.can_address(key):
            got = s3_obstore.fetch_obstore(uri, bucket, key, policy)
            if got is not None:
                return got
        # else: a key that obstore's paths cannot spell (leading / trailing '/', '//', '.' or
        # '..' segments, control characters): boto3 fetches it as is
    return fetch_s3_boto3(uri, bucket, key, policy)


def fetch_s3_boto3(uri: str, bucket: str, key: str, policy: FetchPolicy) -> Fetched:
    client = s3_client()
    last: BaseException | None = None
    for attempt in range(_BODY_ATTEMPTS):
        try:
            resp = client.get_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - mapped below
            raise map_fetch_error(e, uri) from None
        body = resp["Body"]
        try:
            size = resp.get("ContentLength")
            if size is not None and size > policy.max_bytes:
                raise too_large(uri, size, policy.max_bytes)
            data = read_capped(body.read, policy.max_bytes, uri)
        except ImageError:
            raise
        except _TRANSPORT_ERRORS + (bex.BotoCoreError,) as e:
            # the body broke off mid-stream; boto does not retry that, we do
            last = e
            log.debug("S3 body read of %s failed (attempt %d): %s", uri, attempt + 1, e)
            time.sleep(0.1 * (2 ** attempt))
            continue
        finally:
            body.close()
        return Fetched(data=data, etag=clean_etag(resp.get("ETag")), size=len(data))
    assert last is not None
    raise TransientError(f"{uri}: reading the object kept failing ({_describe(last)})",
                         transport_code(last))


# ---------------------------------------------------------------- listing (producer sources)

def _listing_error(e: BaseException, bucket: str, prefix: str) -> Exception:
    where = f"s3://{bucket}/{prefix}"
    if isinstance(e, bex.ClientError):
        code, status = _err(e)
        if code == "NoSuchBucket" or status == 404:
            return ConfigError(f"{where}: bucket {bucket!r} does not exist")
        if code in _DENIED or status == 403:
            return ConfigError(f"{where}: access denied listing the bucket ({code or status})")
        if code in _CREDENTIALS:
            return ConfigError(f"{where}: S3 refused our credentials ({code})")
        if _is_transient(code, status):
            return TransientError(f"{where}: S3 kept failing while listing ({code or status})")
        return ConfigError(f"{where}: S3 error while listing ({code or status})")
    if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return ConfigError(f"{where}: no AWS credentials found")
    if isinstance(e, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        return ConfigError(f"{where}: cannot reach the S3 endpoint ({e})")
    return TransientError(f"{where}: listing failed ({_describe(e)})")


def iter_keys(bucket: str, prefix: str = "", *, recursive: bool = True,
              images_only: bool = True, page_size: int | None = None) -> Iterator[str]:
    """Stream the keys under ``prefix`` page by page (ListObjectsV2), skipping directory markers
    (keys ending in ``/``) and, with ``images_only``, non-image keys. ``recursive=False`` lists
    only the keys directly under ``prefix`` (delimiter ``/``). Missing bucket / no access ->
    ConfigError."""
    paginator = s3_client().get_paginator("list_objects_v2")
    kwargs = {"Bucket": bucket, "Prefix": prefix,
              "PaginationConfig": {"PageSize": page_size or LIST_PAGE_SIZE}}
    if not recursive:
        kwargs["Delimiter"] = "/"
    try:
        for page in paginator.paginate(**kwargs):
            for obj in page.get("Contents", ()) or ():
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                if images_only and not is_image_name(key):
                    continue
                yield key
    except (ConfigError, TransientError):
        raise
    except Exception as e:  # noqa: BLE001
        raise _listing_error(e, bucket, prefix) from None


# ---------------------------------------------------------------- destination

def _put_error(e: BaseException, where: str) -> Exception:
    if isinstance(e, bex.ClientError):
        code, status = _err(e)
        if code == "NoSuchBucket":
            return ConfigError(f"{where}: bucket does not exist")
        if code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired",
                    "RequestTimeTooSkewed"):
            return TransientError(f"{where}: S3 refused our credentials ({code})")
        if code in _DENIED or code in _CREDENTIALS or status == 403:
            return ConfigError(f"{where}: access denied writing results ({code or status}); "
                               "check the worker's AWS credentials and bucket policy")
        return TransientError(f"{where}: S3 write failed ({code or status})")
    if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return ConfigError(f"{where}: no AWS credentials found")
    return TransientError(f"{where}: S3 write failed ({_describe(e)})")


class S3Destination(Destination):
    def __init__(self, bucket: str, prefix: str = ""):
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.dest = f"s3://{bucket}/{prefix}"

    def _key(self, relpath: str) -> str:
        return self.prefix + check_relpath(relpath)

    def uri(self, relpath: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{check_relpath(relpath) if relpath else ''}"

    def put(self, relpath: str, data: bytes, content_type: str = "application/json") -> None:
        key = self._key(relpath)
        try:
            s3_client().put_object(Bucket=self.bucket, Key=key, Body=data,
                                   ContentType=content_type)
        except Exception as e:  # noqa: BLE001
            raise _put_error(e, self.uri(relpath)) from None

    def get(self, relpath: str) -> bytes | None:
        key = self._key(relpath)
        try:
            resp = s3_client().get_object(Bucket=self.bucket, Key=key)
            try:
                return resp["Body"].read()
            finally:
                resp["Body"].close()
        except bex.ClientError as e:
            code, status = _err(e)
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                return None
            raise _put_error(e, self.uri(relpath)) from None
        except Exception as e:  # noqa: BLE001
            raise _put_error(e, self.uri(relpath)) from None

    def exists(self, relpath: str) -> bool:
        key = self._key(relpath)
        try:
            s3_client().head_object(Bucket=self.bucket, Key=key)
            return True
        except bex.ClientError as e:
            code, status = _err(e)
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                return False
            raise _put_error(e, self.uri(relpath)) from None
        except Exception as e:  # noqa: BLE001
            raise _put_error(e, self.uri(relpath)) from None

    def list(self, relprefix: str = "") -> list[str]:
        n = len(self.prefix)
        return sorted(k[n:] for k in iter_keys(self.bucket, self.prefix + relprefix,
                                               images_only=False))


def check_bucket(bucket: str, where: str) -> None:
    """ConfigError unless the bucket exists and we may use it."""
    try:
        s3_client().head_bucket(Bucket=bucket)
    except bex.ClientError as e:
        code, status = _err(e)
        if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
            raise ConfigError(f"{where}: bucket {bucket!r} does not exist") from None
        if status == 403 or code in _DENIED:
            raise ConfigError(f"{where}: access denied to bucket {bucket!r}") from None
        raise ConfigError(f"{where}: cannot use bucket {bucket!r} ({code or status})") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where}: cannot reach S3 ({_describe(e)})") from None


def parse_destination(dest: str) -> tuple[str, str]:
    try:
        return parse_s3(dest, require_key=False)
    except InvalidURI as e:
        raise ConfigError(f"invalid destination {dest!r}: {e}") from None
