"""URI parsing and normalisation shared by the producer and the workers (torch-free).

URI forms we accept for an input image:

* a plain local path (``/data/a.jpg``, ``photos/b.png``) or a ``file://`` URI. A ``file://`` URI
  is percent-decoded (``file:///data/my%20cat.jpg`` is ``/data/my cat.jpg``); the host part must be
  empty or ``localhost``. Everything after the host is path: ``?`` and ``#`` are *not* query or
  fragment separators (write them percent-encoded anyway, as :func:`path_to_file_uri` does).
* ``s3://BUCKET/KEY``. **The key is the raw S3 key, not percent-encoded**: everything after
  ``s3://BUCKET/`` is the key verbatim, so ``s3://b/my cat+dog 100%.jpg`` names the key
  ``my cat+dog 100%.jpg`` and ``s3://b/a?b#c.jpg`` names ``a?b#c.jpg``. (This is the form the AWS
  CLI prints and accepts.) Never run an s3 URI through ``urllib.parse``.
* ``http://`` / ``https://`` URLs (fetched only when the fetch policy allows it).
"""
from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from hnq.errors import ErrorCode, ImageError
from hnq.formats import IMAGE_EXTENSIONS, extension_of

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_NEAR_SCHEME_RE = re.compile(r"^(s3|https?|gs|ftp):", re.IGNORECASE)
# Bucket names: 3-63 chars, lower-case letters, digits, dots, hyphens (underscores for legacy
# us-east-1 buckets), beginning and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,61}[a-z0-9]$")
_MAX_KEY_BYTES = 1024


class InvalidURI(ImageError):
    """A malformed URI (``code`` is ``invalid_uri``)."""

    code = ErrorCode.invalid_uri


def is_image_name(name: str) -> bool:
    """True when ``name`` (a path, key or URL path) ends with one of :data:`IMAGE_EXTENSIONS`
    (case-insensitive; the one list, derived from what the decoder reads: :mod:`hnq.formats`)."""
    return extension_of(name) in IMAGE_EXTENSIONS


def scheme_of(uri: str) -> str:
    """The lower-case scheme of ``uri``; ``"file"`` for plain local paths and ``file:`` URIs."""
    m = _SCHEME_RE.match(uri)
    if m:
        return m.group(1).lower()
    m = _NEAR_SCHEME_RE.match(uri)
    if m:  # "s3:bucket/key", "http:/host": a mistyped URI, not a relative path
        return m.group(1).lower()
    return "file"  # plain path, "file:/abs"


def check_basic(uri: str) -> None:
    """Reject what no scheme accepts: non-strings, empty strings, NUL bytes."""
    if not isinstance(uri, str):
        raise InvalidURI(f"URI must be a string, got {type(uri).__name__}")
    if not uri or not uri.strip():
        raise InvalidURI("empty URI")
    if "\x00" in uri:
        raise InvalidURI("URI contains a NUL byte")


def validate_bucket(bucket: str, uri: str = "") -> str:
    if not bucket:
        raise InvalidURI(f"no bucket in S3 URI {uri!r} (expected s3://BUCKET/KEY)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidURI(f"invalid S3 bucket name {bucket!r} in {uri!r}")
    return bucket


def parse_s3(uri: str, *, require_key: bool = True) -> tuple[str, str]:
    """Split ``s3://BUCKET/KEY`` into ``(bucket, key)``; the key is taken verbatim (see module doc).

    ``require_key=False`` accepts ``s3://BUCKET``, ``s3://BUCKET/`` and ``s3://BUCKET/prefix/``
    (for listing and destinations); the key is then ``""`` or the prefix.
    Raises :class:`InvalidURI` (an :class:`ImageError` with code ``invalid_uri``)."""
    check_basic(uri)
    if uri[:5].lower() != "s3://":
        raise InvalidURI(f"not an S3 URI: {uri!r}")
    rest = uri[5:]
    bucket, sep, key = rest.partition("/")
    validate_bucket(bucket, uri)
    if require_key and not key:
        raise InvalidURI(f"no key in S3 URI {uri!r} (expected s3://BUCKET/KEY)")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise InvalidURI(f"S3 key longer than {_MAX_KEY_BYTES} bytes in {uri[:80]!r}...")
    return bucket, key


def s3_uri(bucket: str, key: str) -> str:
    """The inverse of :func:`parse_s3` (no encoding)."""
    return f"s3://{bucket}/{key}"


def file_uri_to_path(uri: str) -> str:
    """Local path named by a plain path or a ``file://`` URI (percent-decoded; non-UTF-8 bytes
    round-trip through ``os.fsdecode``). Raises :class:`InvalidURI`."""
    check_basic(uri)
    if uri[:5].lower() != "file:":
        return uri
    rest = uri[5:]
    if rest.startswith("//"):
        rest = rest[2:]
        host, slash, path = rest.partition("/")
        if host.lower() not in ("", "localhost"):
            raise InvalidURI(f"file URI with a remote host {host!r} is not supported: {uri!r}")
        path = slash + path
    else:
        path = rest  # file:/abs/path
    if not path.startswith("/"):
        raise InvalidURI(f"file URI must hold an absolute path: {uri!r}")
    decoded = os.fsdecode(urllib.parse.unquote_to_bytes(path))
    if "\x00" in decoded:
        raise InvalidURI("file URI decodes to a path with a NUL byte")
    return decoded


def path_to_file_uri(path: str | os.PathLike) -> str:
    """Absolute ``file://`` URI of a local path (made absolute against the cwd, not resolved),
    percent-encoded so that spaces, ``%``, ``?``, ``#`` and unicode round-trip through
    :func:`file_uri_to_path`."""
    p = Path(os.path.abspath(os.fspath(path)))
    return "file://" + urllib.parse.quote_from_bytes(os.fsencode(p), safe="/")


def parse_http(uri: str) -> urllib.parse.SplitResult:
    """Split an http(s) URL and check it names a host. Raises :class:`InvalidURI`."""
    check_basic(uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise InvalidURI(f"malformed URL {uri!r}: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidURI(f"not an http(s) URL: {uri!r}")
    if not parts.hostname:
        raise InvalidURI(f"no host in URL {uri!r}")
    if any(c.isspace() for c in uri):
        raise InvalidURI(f"URL contains whitespace: {uri!r}")
    return parts
