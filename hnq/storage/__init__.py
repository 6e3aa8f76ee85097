"""Torch-free storage layer: fetch one input image from a local path / ``file://`` / ``s3://`` /
``http(s)://`` URI under a :class:`FetchPolicy`, and write results to a :class:`Destination`
(``s3://bucket/prefix/`` or a local directory).

URI forms (see :mod:`hnq.uris`): **an ``s3://BUCKET/KEY`` URI carries the raw key, not
percent-encoded** (``s3://b/a b+c%.jpg`` is the key ``a b+c%.jpg``; ``?`` and ``#`` are part of
the key); a ``file://`` URI is percent-decoded; a plain path is taken as is.

Errors of :func:`fetch`: :class:`~hnq.errors.ImageError` with a code from
:class:`~hnq.errors.ErrorCode` for a problem with this one image (not_found, access_denied,
too_large, unsupported_scheme, invalid_uri, forbidden, timeout, fetch_error);
:class:`~hnq.errors.TransientError` for storage trouble that outlived the retries (the caller
retries later; the image must not get a permanent error record before it gives up), with a code:
``throttled`` (SlowDown / 503 / 429), ``timeout`` or ``fetch_error``.

The policy's confinement is checked before any request: http(s) hosts and addresses, file roots,
and for ``s3://`` the source buckets (``FetchPolicy.source_buckets``, HARDNET_SOURCE_BUCKETS): an
object of another bucket is ``forbidden`` without a request.

``s3://`` GETs use obstore or boto3 (``FetchPolicy.s3_client``, see :mod:`hnq.storage.s3.get` and
:mod:`hnq.storage.s3.get_obstore`), with the same semantics; listing and writes use boto3.

This package's ``__init__`` is the facade the rest of the code imports (fetch, destinations); the
backends live in :mod:`~hnq.storage.file`, :mod:`~hnq.storage.http` and :mod:`hnq.storage.s3`.
"""
from __future__ import annotations

import os

from hnq.errors import ConfigError, ErrorCode, ImageError
from hnq.storage.base import Destination, Fetched, FetchPolicy, check_source_bucket
from hnq.storage.file import FileDestination, check_writable_dir, fetch_file
from hnq.storage.http import fetch_http
from hnq.storage.s3.client import reset_s3_client, s3_client
from hnq.storage.s3.destination import S3Destination, check_bucket, parse_destination
from hnq.storage.s3.get import fetch_s3
from hnq.uris import InvalidURI, check_basic, file_uri_to_path, parse_s3, path_to_file_uri, scheme_of

__all__ = [
    "FetchPolicy", "Fetched", "fetch", "s3_client", "reset_s3_client", "Destination",
    "S3Destination", "FileDestination", "open_destination", "validate_destination",
    "check_writable", "check_source_bucket",
]

_SUPPORTED = ("s3://BUCKET/KEY, file:///path or a local path, and http(s):// when enabled "
              "(HARDNET_ALLOW_HTTP=1 and HARDNET_HTTP_ALLOW_HOSTS)")


def fetch(uri: str, policy: FetchPolicy | None = None, on_size=None) -> Fetched:
    """The bytes of one image. Zero bytes are returned as is (the decoder reports ``empty``).
    ``on_size(n | None)``, when given, is called once the object's size is announced (None: not
    announced), after the size cap was checked and before the body is read; it may block (the
    engine's byte budget) or raise (the fetch fails with that error). A backend that retries
    calls it again for each read of the body."""
    policy = policy or FetchPolicy()
    check_basic(uri)
    scheme = scheme_of(uri)
    if scheme == "s3":
        if policy.source_buckets is not None:   # before any request: nothing is fetched outside
            check_source_bucket(parse_s3(uri)[0], uri, policy.source_buckets)
        return fetch_s3(uri, policy, on_size)
    if scheme == "file":
        return fetch_file(uri, policy, on_size)
    if scheme in ("http", "https"):
        return fetch_http(uri, policy, on_size)
    raise ImageError(f"{uri[:200]}: unsupported URI scheme {scheme!r}; supported: {_SUPPORTED}",
                     ErrorCode.unsupported_scheme)


def validate_destination(dest: str) -> str:
    """Normalised destination: ``s3://bucket/prefix/`` (trailing slash; ``s3://bucket/`` for the
    bucket root) or ``file:///abs/dir/`` for a ``file://`` URI or a plain path (made absolute).
    ConfigError with a clear message for anything else."""
    if not isinstance(dest, str) or not dest.strip():
        raise ConfigError("empty destination; give s3://BUCKET/PREFIX/ or a local directory")
    dest = dest.strip()
    if "\x00" in dest:
        raise ConfigError("destination contains a NUL byte")
    scheme = scheme_of(dest)
    if scheme == "s3":
        bucket, prefix = parse_destination(dest)
        if prefix.startswith("/") or "//" in prefix:
            raise ConfigError(f"invalid destination {dest!r}: empty path segment in the prefix")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return f"s3://{bucket}/{prefix}"
    if scheme == "file":
        try:
            path = file_uri_to_path(dest)
        except InvalidURI as e:
            raise ConfigError(f"invalid destination {dest!r}: {e}") from None
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"destination {dest!r} exists and is not a directory")
        return path_to_file_uri(path).rstrip("/") + "/"
    raise ConfigError(f"unsupported destination {dest!r}: results go to s3://BUCKET/PREFIX/, "
                      "file:///DIR/ or a local directory")


def open_destination(dest: str) -> Destination:
    norm = validate_destination(dest)
    if norm.startswith("s3://"):
        bucket, prefix = parse_destination(norm)
        return S3Destination(bucket, prefix)
    return FileDestination(file_uri_to_path(norm))


def check_writable(dest: str) -> None:
    """Fail fast (ConfigError) before enqueueing: the bucket must exist and be reachable; a local
    directory is created if needed and must be writable."""
    d = open_destination(dest)
    if isinstance(d, S3Destination):
        check_bucket(d.bucket, d.dest)
    else:
        assert isinstance(d, FileDestination)
        check_writable_dir(d.root)
