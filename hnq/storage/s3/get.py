"""GET one ``s3://`` image: through boto3 here, or through obstore
(:mod:`hnq.storage.s3.get_obstore`), as ``FetchPolicy.s3_client`` asks.

``auto`` takes obstore when it is installed and usable in this process, ``obstore`` insists on it,
``boto3`` never uses it. Why two clients: obstore costs less client CPU per object (figures:
docs/performance.md#s3-get-client); boto3 stays for what obstore cannot do (keys its paths cannot
spell, a process forked after obstore started its runtime, ``HARDNET_S3_RETRY_MODE=adaptive``).
Both keep the same semantics: credentials, endpoint, addressing, retry budget, size cap and the
error mapping of :mod:`hnq.storage.s3.errors`.
"""
from __future__ import annotations

import logging
import time

import botocore.exceptions as bex

from hnq.errors import ConfigError, ImageError, TransientError
from hnq.storage.base import Fetched, FetchPolicy, clean_etag, read_capped, too_large
from hnq.storage.s3.client import s3_client
from hnq.storage.s3.errors import TRANSPORT_ERRORS, describe, map_fetch_error, transport_code
from hnq.uris import parse_s3

log = logging.getLogger(__name__)

GET_CLIENTS = ("auto", "obstore", "boto3")
#: reads of one object whose body broke off mid-stream (boto3 does not retry those; we do)
_BODY_ATTEMPTS = 3

_obstore_ok: bool | None = None


def obstore_available() -> bool:
    """Whether obstore can be imported (the answer is remembered)."""
    global _obstore_ok
    if _obstore_ok is None:
        try:
            # imported here, not at the top: obstore is optional, and a process that never GETs
            # from S3 (the producer) should not load it
            import hnq.storage.s3.get_obstore  # noqa: F401
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
    from hnq.storage.s3 import get_obstore  # optional: see obstore_available()

    return "obstore" if get_obstore.usable_here() else "boto3"


def fetch_s3(uri: str, policy: FetchPolicy, on_size=None) -> Fetched:
    """``on_size(n | None)``: called with the object's announced size (GetObject's
    ``ContentLength``, obstore's meta size) before its body is read."""
    bucket, key = parse_s3(uri)
    if get_client_for(policy.s3_client) == "obstore":
        from hnq.storage.s3 import get_obstore  # optional: see obstore_available()

        if get_obstore.can_address(key):
            got = get_obstore.fetch_obstore(uri, bucket, key, policy, on_size)
            if got is not None:
                return got
        # else: a key that obstore's paths cannot spell (leading / trailing '/', '//', '.' or
        # '..' segments, control characters): boto3 fetches it as is
    return fetch_s3_boto3(uri, bucket, key, policy, on_size)


def fetch_s3_boto3(uri: str, bucket: str, key: str, policy: FetchPolicy, on_size=None) -> Fetched:
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
            if on_size is not None:
                on_size(size)
            data = read_capped(body.read, policy.max_bytes, uri)
        except ImageError:
            raise
        except TRANSPORT_ERRORS + (bex.BotoCoreError,) as e:
            # the body broke off mid-stream; boto does not retry that, we do
            last = e
            log.debug("S3 body read of %s failed (attempt %d): %s", uri, attempt + 1, e)
            time.sleep(0.1 * (2 ** attempt))
            continue
        finally:
            body.close()
        return Fetched(data=data, etag=clean_etag(resp.get("ETag")), size=len(data))
    assert last is not None
    raise TransientError(f"{uri}: reading the object kept failing ({describe(last)})",
                         transport_code(last))
