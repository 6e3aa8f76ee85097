"""Types shared by the storage backends: the fetch policy, a fetched object, the destination
interface and a capped reader."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable

from hnq.errors import ErrorCode, ImageError
from hnq.options import part_relpath


@dataclass(frozen=True)
class FetchPolicy:
    """What :func:`hnq.storage.fetch` may do.

    * ``max_bytes``: objects larger than this are ``too_large`` (checked on the announced size
      first, and enforced while streaming: at most ``max_bytes + 1`` bytes are ever read).
    * ``timeout_s``: per-socket-operation timeout and overall deadline of an http(s) fetch and
      ``timeout`` of a local read deadline; S3 uses the client's own timeouts (see ``s3_client``).
    * ``allow_http`` / ``http_allow_hosts``: http(s) URLs are fetched only when ``allow_http`` and
      the host matches an entry (exact name, ``*.example.com`` or ``*``); empty = none.
    * ``allow_private_networks``: http(s) to loopback, link-local (169.254.169.254), RFC 1918, ULA,
      unspecified, multicast... addresses is refused unless True.
    * ``file_roots``: None = local files anywhere; a tuple = only under those directories (after
      resolving symlinks and ``..``); ``()`` = local files refused.
    * ``source_buckets``: None = ``s3://`` objects of any bucket (what the credentials can read);
      a tuple = only objects of those buckets, anything else is ``forbidden`` before any request
      (``HARDNET_SOURCE_BUCKETS``); ``()`` = no ``s3://`` source at all.
    * ``s3_client``: what GETs ``s3://`` objects: ``auto`` (obstore when it is installed, else
      boto3), ``obstore`` or ``boto3`` (see :func:`hnq.storage.s3.get.get_client_for`).
    """

    max_bytes: int = 50 * 2**20
    timeout_s: float = 30.0
    allow_http: bool = False
    http_allow_hosts: tuple[str, ...] = ()
    allow_private_networks: bool = False
    file_roots: tuple[str, ...] | None = field(default=None)
    s3_client: str = "auto"
    source_buckets: tuple[str, ...] | None = None


def check_source_bucket(bucket: str, uri: str, buckets: tuple[str, ...] | None) -> None:
    """ImageError ``forbidden`` unless ``bucket`` is one of ``buckets`` (None = any bucket)."""
    if buckets is not None and bucket not in buckets:
        raise ImageError(f"{uri[:300]}: bucket {bucket!r} is not in HARDNET_SOURCE_BUCKETS "
                         "(the buckets this process may read images from)", ErrorCode.forbidden)


@dataclass
class Fetched:
    data: bytes
    etag: str | None
    size: int


def clean_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"') or None


def too_large(uri: str, size: int | None, max_bytes: int) -> ImageError:
    what = f"{size} bytes" if size is not None else f"more than {max_bytes} bytes"
    return ImageError(f"{uri}: object is {what}, over the {max_bytes}-byte download cap",
                      ErrorCode.too_large)


def read_capped(read: Callable[[int], bytes], max_bytes: int, uri: str,
                tick: Callable[[], None] | None = None, block: int = 1 << 20) -> bytes:
    """Read until EOF with ``read(n)`` but never more than ``max_bytes + 1`` bytes in all; raise
    ``too_large`` if there is more than ``max_bytes``. ``tick`` is called between reads (deadline
    checks)."""
    parts: list[bytes] = []
    total = 0
    limit = max_bytes + 1
    while total < limit:
        chunk = read(min(block, limit - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        if tick is not None:
            tick()
    if total > max_bytes:
        raise too_large(uri, None, max_bytes)
    return b"".join(parts)


def check_relpath(relpath: str) -> str:
    """A destination-relative path: forward slashes, no leading slash, no ``.``/``..`` segment,
    no NUL. Raises ValueError."""
    if not isinstance(relpath, str):
        raise ValueError(f"relpath must be a string, got {type(relpath).__name__}")
    if "\x00" in relpath or "\\" in relpath:
        raise ValueError(f"invalid destination path {relpath!r}")
    if relpath.startswith("/"):
        raise ValueError(f"destination path must be relative: {relpath!r}")
    segs = relpath.split("/")
    if any(s in (".", "..") for s in segs):
        raise ValueError(f"destination path may not contain . or .. segments: {relpath!r}")
    return relpath


class Destination(abc.ABC):
    """Where results go: ``s3://bucket/prefix/`` or a local directory. Paths are relative to the
    destination's root and use ``/``."""

    #: normalised destination string (what :func:`hnq.storage.validate_destination` returns)
    dest: str

    @abc.abstractmethod
    def put(self, relpath: str, data: bytes, content_type: str = "application/json") -> None:
        """Write (replace) ``relpath`` atomically. TransientError on storage hiccups that outlive
        the retries; ConfigError when we may not write there."""

    @abc.abstractmethod
    def get(self, relpath: str) -> bytes | None:
        """Contents of ``relpath``, or None when it does not exist."""

    @abc.abstractmethod
    def list(self, relprefix: str = "") -> list[str]:
        """Relative paths of the objects whose relative path starts with ``relprefix`` (a plain
        string prefix, as in S3), sorted."""

    @abc.abstractmethod
    def exists(self, relpath: str) -> bool:
        ...

    @abc.abstractmethod
    def delete(self, relpaths: list[str]) -> int:
        """Delete these objects (one that does not exist is no error); returns how many were
        asked for. TransientError / ConfigError as for :meth:`put`."""

    def get_versioned(self, relpath: str) -> tuple[bytes, str] | None:
        """(contents, version) of ``relpath``, or None when it does not exist; the version is
        what :meth:`put_if` compares (S3: the ETag)."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def put_if(self, relpath: str, data: bytes, content_type: str = "application/json", *,
               expect: str | None = None) -> bool:
        """Write ``relpath`` only if it does not exist (``expect`` None) or still has the version
        ``expect`` (from :meth:`get_versioned`); False, nothing written, when that condition
        failed. Used for parts, which must never regress (hnq.jobs.parts.write_part)."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    @abc.abstractmethod
    def uri(self, relpath: str = "") -> str:
        """Full URI of ``relpath`` (``s3://bucket/prefix/relpath`` or ``file:///dir/relpath``)."""

    @staticmethod
    def part_path(job_id: str, chunk: int, fmt: str = "jsonl") -> str:
        """DEST-relative path of a chunk's part: JOB/part-NNNNN.jsonl or .parquet (hnq.options)."""
        return part_relpath(job_id, chunk, fmt)

    @staticmethod
    def manifest_path(job_id: str) -> str:
        return f"{job_id}/manifest.json"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dest!r})"
