"""Turn the producer's sources into a *stream* of image URIs (never a list: a prefix can hold
millions of keys).

Sources (:func:`expand_sources`):

* local file or ``file://`` file -> its absolute ``file://`` URI (percent-encoded, so spaces, ``%``,
  ``#`` and unicode round-trip through :func:`hnq.storage.fetch`), whatever its extension;
* local directory / ``file://`` directory -> every image file below it (sorted, depth-first;
  ``recursive=False``: only the files directly in it). Directory symlinks are not followed;
* ``s3://bucket`` , ``s3://bucket/`` or ``s3://bucket/prefix/`` -> every image key under it
  (ListObjectsV2 pages, directory markers skipped), as :class:`~hnq.objects.SourceObject` URIs
  that carry the ETag, size and storage class; one sorted stream, or fanned out over the
  prefix's folders with ``list_threads`` > 1 (:mod:`hnq.storage.s3.listing`, no fixed order then);
* ``s3://bucket/key`` with an image extension -> emitted as given (no HEAD). Without an image
  extension (``s3://bucket/photos``) it is taken as the folder ``photos/``; if that lists nothing
  the URI is emitted as given;
* ``http(s)://...`` -> emitted as given (the worker enforces the fetch policy).

A missing local path, a missing bucket or an unknown scheme raises ConfigError while iterating.
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Iterable, Iterator

from hnq.errors import ConfigError
from hnq.storage.file import within_roots
from hnq.storage.s3.listing import list_objects
from hnq.uris import InvalidURI, file_uri_to_path, is_image_name, parse_s3, path_to_file_uri, scheme_of


def _walk(root: str, recursive: bool) -> Iterator[str]:
    """Image files under ``root``, sorted per directory, depth-first, streaming."""
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise ConfigError(f"{root}: permission denied listing the directory") from None
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    yield from _walk(entry.path, recursive)
            elif entry.is_file() and is_image_name(entry.name):
                yield entry.path
        except OSError:
            continue


def _expand_local(source: str, *, recursive: bool, file_roots, must_exist: bool = True
                  ) -> Iterator[str]:
    try:
        path = file_uri_to_path(source)
    except InvalidURI as e:
        raise ConfigError(f"invalid source {source!r}: {e}") from None
    path = os.path.abspath(os.path.expanduser(path))
    if file_roots is not None and within_roots(path, tuple(file_roots)) is None:
        raise ConfigError(f"source {source!r} is outside the allowed file roots")
    if os.path.isdir(path):
        for p in _walk(path, recursive):
            yield path_to_file_uri(p)
    elif os.path.exists(path) or not must_exist:
        yield path_to_file_uri(path)
    else:
        raise ConfigError(f"source {source!r} does not exist")


def _expand_s3(source: str, *, recursive: bool, list_threads: int = 1, list_depth: int = 2
               ) -> Iterator[str]:
    try:
        bucket, key = parse_s3(source, require_key=False)
    except InvalidURI as e:
        raise ConfigError(f"invalid source {source!r}: {e}") from None
    if key and not key.endswith("/") and is_image_name(key):
        yield source
        return
    prefix = key if (not key or key.endswith("/")) else key + "/"
    found = False
    # SourceObjects (str URIs with ETag, size, storage class); fanned out (hnq.storage.s3.listing)
    for obj in list_objects(bucket, prefix, threads=list_threads, depth=list_depth, recursive=recursive):
        found = True
        yield obj
    if not found and key and not key.endswith("/"):
        yield source  # an object without an image extension, perhaps: the worker will tell


def expand_sources(sources: Iterable[str], *, recursive: bool = True,
                   file_roots: tuple[str, ...] | list[str] | None = None, list_threads: int = 1,
                   list_depth: int = 2) -> Iterator[str]:
    """Stream the image URIs of ``sources`` (see the module doc). ``file_roots``: when given,
    local sources outside them are refused (ConfigError). ``list_threads`` / ``list_depth``: how
    S3 prefixes are listed (:mod:`hnq.storage.s3.listing`; 1 thread = one sorted stream)."""
    for source in sources:
        if not isinstance(source, str) or not source.strip():
            raise ConfigError("empty source")
        source = source.strip()
        if "\x00" in source:
            raise ConfigError("source contains a NUL byte")
        scheme = scheme_of(source)
        if scheme == "file":
            yield from _expand_local(source, recursive=recursive, file_roots=file_roots)
        elif scheme == "s3":
            yield from _expand_s3(source, recursive=recursive, list_threads=list_threads,
                                  list_depth=list_depth)
        elif scheme in ("http", "https"):
            yield source
        else:
            raise ConfigError(f"unsupported source {source!r}: use a local path, file://, "
                              "s3://BUCKET/[PREFIX/] or http(s)://")


def read_uri_list(path_or_dash: str, *, recursive: bool = True,
                  file_roots: tuple[str, ...] | list[str] | None = None) -> Iterator[str]:
    """One URI per line from a file (UTF-8) or stdin (``-``); blank lines and lines starting with
    ``#`` skipped, surrounding whitespace stripped. Local paths (relative ones against the cwd) and
    ``file://`` URIs become absolute ``file://`` URIs, directories are expanded like sources; a
    local path that does not exist is passed on (the worker reports it ``not_found``) rather than
    aborting a long list; so is a malformed ``file:`` or ``s3://`` line (``s3://``,
    ``file://otherhost/x.jpg``: the worker records it ``invalid_uri``). Well-formed
    ``s3://bucket/prefix/`` lines (ending in ``/``) are expanded; every other line is passed on as
    given. Streaming."""
    if path_or_dash == "-":
        yield from _lines(sys.stdin, recursive=recursive, file_roots=file_roots)
        return
    try:
        f = open(path_or_dash, encoding="utf-8-sig", newline=None)
    except FileNotFoundError:
        raise ConfigError(f"URI list {path_or_dash!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read URI list {path_or_dash!r}: {e.strerror or e}") from None
    with f:
        yield from _lines(f, recursive=recursive, file_roots=file_roots)


def _lines(f, *, recursive: bool, file_roots) -> Iterator[str]:
    for raw in f:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        scheme = scheme_of(line)
        if scheme == "file":
            if _malformed(file_uri_to_path, line):
                yield line  # the worker records it invalid_uri; one bad line never stops the list
                continue
            yield from _expand_local(line, recursive=recursive, file_roots=file_roots,
                                     must_exist=False)
        elif scheme == "s3" and line.endswith("/"):
            if _malformed(lambda u: parse_s3(u, require_key=False), line):
                yield line  # e.g. "s3://": invalid_uri from the worker, not a failed submit
                continue
            yield from _expand_s3(line, recursive=recursive)
        else:
            yield line


def _malformed(parse, line: str) -> bool:
    try:
        parse(line)
    except InvalidURI:
        return True
    return False


def chunked(it: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of ``size`` items (the last one shorter); streaming."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    iterator = iter(it)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk
