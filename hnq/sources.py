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

"Image" file or key: one whose extension is in ``extensions`` (an
:class:`hnq.formats.ExtensionFilter`; default: every extension the decoder reads, any case;
``--extensions any`` takes every file and key, also those without an extension). What a directory
walk or a listing leaves out is counted per extension on that filter (the job's
``skipped_by_extension``). A file or object named alone is taken whatever its extension.

A missing local path, a missing bucket or an unknown scheme raises ConfigError while iterating.
"""
from __future__ import annotations

import codecs
import io
import itertools
import os
import sys
import tempfile
from typing import IO, Iterable, Iterator

from hnq.errors import ConfigError
from hnq.formats import ExtensionFilter
from hnq.storage.file import within_roots
from hnq.storage.s3.listing import list_objects
from hnq.uris import InvalidURI, file_uri_to_path, parse_s3, path_to_file_uri, scheme_of


def _walk(root: str, recursive: bool, keep: ExtensionFilter) -> Iterator[str]:
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
                    yield from _walk(entry.path, recursive, keep)
            elif entry.is_file() and keep.keep(entry.name):
                yield entry.path
        except OSError:
            continue


def _local_path(source: str, file_roots, must_exist: bool = True) -> str:
    """The absolute path of a local source; ConfigError when it is malformed, outside
    ``file_roots``, or (``must_exist``) missing."""
    try:
        path = file_uri_to_path(source)
    except InvalidURI as e:
        raise ConfigError(f"invalid source {source!r}: {e}") from None
    path = os.path.abspath(os.path.expanduser(path))
    if file_roots is not None and within_roots(path, tuple(file_roots)) is None:
        raise ConfigError(f"source {source!r} is outside the allowed file roots")
    if must_exist and not os.path.exists(path):
        raise ConfigError(f"source {source!r} does not exist")
    return path


def _expand_local(source: str, *, recursive: bool, file_roots, keep: ExtensionFilter,
                  must_exist: bool = True) -> Iterator[str]:
    path = _local_path(source, file_roots, must_exist=False)
    if os.path.isdir(path):
        for p in _walk(path, recursive, keep):
            yield path_to_file_uri(p)
    elif os.path.exists(path) or not must_exist:
        yield path_to_file_uri(path)
    else:
        raise ConfigError(f"source {source!r} does not exist")


def _expand_s3(source: str, *, recursive: bool, keep: ExtensionFilter, list_threads: int = 1,
               list_depth: int = 2) -> Iterator[str]:
    try:
        bucket, key = parse_s3(source, require_key=False)
    except InvalidURI as e:
        raise ConfigError(f"invalid source {source!r}: {e}") from None
    if key and not key.endswith("/") and keep.names_image(key):
        yield source
        return
    prefix = key if (not key or key.endswith("/")) else key + "/"
    found = False
    # SourceObjects (str URIs with ETag, size, storage class); fanned out (hnq.storage.s3.listing)
    for obj in list_objects(bucket, prefix, threads=list_threads, depth=list_depth, recursive=recursive,
                            extensions=keep):
        found = True
        yield obj
    if not found and key and not key.endswith("/"):
        yield source  # an object without an image extension, perhaps: the worker will tell


def _source_and_scheme(source) -> tuple[str, str]:
    """A SOURCE argument stripped, and its scheme; ConfigError for an empty one or a NUL byte."""
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("empty source")
    source = source.strip()
    if "\x00" in source:
        raise ConfigError("source contains a NUL byte")
    return source, scheme_of(source)


def expand_sources(sources: Iterable[str], *, recursive: bool = True,
                   file_roots: tuple[str, ...] | list[str] | None = None, list_threads: int = 1,
                   list_depth: int = 2, extensions: "ExtensionFilter | str | None" = None
                   ) -> Iterator[str]:
    """Stream the image URIs of ``sources`` (see the module doc). ``file_roots``: when given,
    local sources outside them are refused (ConfigError). ``list_threads`` / ``list_depth``: how
    S3 prefixes are listed (:mod:`hnq.storage.s3.listing`; 1 thread = one sorted stream).
    ``extensions``: which listed files and keys are kept (an ExtensionFilter, which counts the
    others; ``"any"``; a list such as ``"jpg,png"``); unset: the image extensions."""
    keep = ExtensionFilter.of(extensions)
    for source in sources:
        source, scheme = _source_and_scheme(source)
        if scheme == "file":
            yield from _expand_local(source, recursive=recursive, file_roots=file_roots, keep=keep)
        elif scheme == "s3":
            yield from _expand_s3(source, recursive=recursive, keep=keep, list_threads=list_threads,
                                  list_depth=list_depth)
        elif scheme in ("http", "https"):
            yield source
        else:
            raise ConfigError(f"unsupported source {source!r}: use a local path, file://, "
                              "s3://BUCKET/[PREFIX/] or http(s)://")


def check_sources(sources: Iterable[str], *, file_roots: tuple[str, ...] | list[str] | None = None) -> None:
    """What :func:`expand_sources` would refuse while iterating, checked before anything exists
    (no listing, no request): an empty source, a NUL byte, an unknown scheme, a malformed
    ``s3://`` or ``file:`` URI, a local path that does not exist or lies outside ``file_roots``.
    A bucket that cannot be listed is found only when it is listed."""
    for source in sources:
        source, scheme = _source_and_scheme(source)
        if scheme == "file":
            _local_path(source, file_roots)
        elif scheme == "s3":
            try:
                parse_s3(source, require_key=False)
            except InvalidURI as e:
                raise ConfigError(f"invalid source {source!r}: {e}") from None
        elif scheme not in ("http", "https"):
            raise ConfigError(f"unsupported source {source!r}: use a local path, file://, "
                              "s3://BUCKET/[PREFIX/] or http(s)://")


#: bytes read at a time when a URI list is checked
_BLOCK = 1 << 20


def check_uri_list(path_or_dash: str, *, tmpdir: str | None = None, require_s3: bool = False,
                   option: str = "--from-file") -> "str | IO[bytes]":
    """Read a URI list once, whole, before anything is submitted: every byte must be UTF-8 (a
    byte-order mark first is allowed) and, with ``require_s3`` (``--tag``), every URI line an
    ``s3://`` one. ConfigError naming ``option``, the line and the byte offset otherwise. Returns
    what :func:`read_uri_list` then reads: the path again, or for stdin (``-``, readable only
    once) an unnamed temporary file in ``tmpdir`` holding what was read, at its start.

    Why a whole first pass rather than checking while submitting: a bad line 9 million lines in
    would otherwise come after 9 million URIs were stored and enqueued. The pass is a sequential
    read at disk speed, the incremental decoder runs in C, and nothing is held in memory but one
    block (stdin's copy goes to disk)."""
    spool = None
    if path_or_dash == "-":
        f, name = sys.stdin.buffer, "- (stdin)"
        spool = tempfile.TemporaryFile(dir=tmpdir, prefix="hardnet-uri-list-")
    else:
        name = path_or_dash
        try:
            f = open(path_or_dash, "rb")
        except FileNotFoundError:
            raise ConfigError(f"{option} {path_or_dash!r} does not exist") from None
        except OSError as e:
            raise ConfigError(f"{option} {path_or_dash!r} cannot be read: {e.strerror or e}") from None
    try:
        dec = codecs.getincrementaldecoder("utf-8")("strict")
        done = 0          # bytes read before this block
        line = 1          # the line this block starts in
        tail = b""        # with require_s3: the start of a line not yet ended
        first_row = True
        while True:
            try:
                block = f.read(_BLOCK)
            except OSError as e:
                raise ConfigError(f"{option} {name!r} cannot be read: {e.strerror or e}") from None
            if spool is not None:
                spool.write(block)
            held = dec.getstate()[0]      # the start of a character cut by the last block
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = e.start - len(held)  # in this block; < 0: in the bytes held from the last
                where = line + block.count(b"\n", 0, max(at, 0))
                what = f"byte 0x{block[at]:02x}" if 0 <= at < len(block) else "a cut-off character"
                raise ConfigError(f"{option} {name!r}: line {where} is not UTF-8 ({what} at byte "
                                  f"offset {done + at}); nothing was submitted. Convert it first, "
                                  "e.g. iconv -f latin1 -t utf-8") from None
            if require_s3:
                rows = (tail + block).split(b"\n")
                tail = rows.pop() if block else b""
                for i, raw in enumerate(rows):
                    _require_s3_line(raw, option, name, line + i, first=first_row)
                    first_row = False
            line += block.count(b"\n")
            if not block:
                break
            done += len(block)
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    finally:
        if spool is None:
            f.close()
    if spool is None:
        return path_or_dash
    spool.seek(0)
    return spool


def _require_s3_line(raw: bytes, option: str, name: str, n: int, *, first: bool) -> None:
    line = raw.decode("utf-8")
    if first:
        line = line.removeprefix("\ufeff")
    line = line.strip()
    if line and not line.startswith("#") and not line.startswith("s3://"):
        raise ConfigError(f"--tag writes S3 object tags, but line {n} of {option} {name!r} "
                          f"({line[:300]!r}) is not an s3:// object; nothing was submitted")


def read_uri_list(path_or_dash: "str | IO[bytes]", *, recursive: bool = True,
                  file_roots: tuple[str, ...] | list[str] | None = None,
                  extensions: "ExtensionFilter | str | None" = None) -> Iterator[str]:
    """One URI per line from a file (UTF-8) or stdin (``-``); blank lines and lines starting with
    ``#`` skipped, surrounding whitespace stripped. Local paths (relative ones against the cwd) and
    ``file://`` URIs become absolute ``file://`` URIs, directories are expanded like sources; a
    local path that does not exist is passed on (the worker reports it ``not_found``) rather than
    aborting a long list; so is a malformed ``file:`` or ``s3://`` line (``s3://``,
    ``file://otherhost/x.jpg``: the worker records it ``invalid_uri``). Well-formed
    ``s3://bucket/prefix/`` lines (ending in ``/``) are expanded; every other line is passed on as
    given. Streaming. ``path_or_dash`` may also be the binary file :func:`check_uri_list` returned
    (checked first: `hardnet submit` does). Bytes that are not UTF-8 raise ConfigError.
    ``extensions``: as for :func:`expand_sources`, for the directories and prefixes it expands
    (every other line is taken as given)."""
    keep = ExtensionFilter.of(extensions)
    if not isinstance(path_or_dash, str):
        f = io.TextIOWrapper(path_or_dash, encoding="utf-8-sig", newline=None)
        name = "- (stdin)"
    elif path_or_dash == "-":
        f = sys.stdin
        name = "- (stdin)"
    else:
        name = path_or_dash
        try:
            f = open(path_or_dash, encoding="utf-8-sig", newline=None)
        except FileNotFoundError:
            raise ConfigError(f"URI list {path_or_dash!r} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read URI list {path_or_dash!r}: {e.strerror or e}") from None
    try:
        yield from _lines(f, recursive=recursive, file_roots=file_roots, keep=keep)
    except UnicodeDecodeError as e:
        raise ConfigError(f"URI list {name!r} is not UTF-8 ({e.reason} at byte {e.start} of a block): "
                          "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    finally:
        if f is not sys.stdin:
            f.close()


def _lines(f, *, recursive: bool, file_roots, keep: ExtensionFilter) -> Iterator[str]:
    for raw in f:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        scheme = scheme_of(line)
        if scheme == "file":
            if _malformed(file_uri_to_path, line):
                yield line  # the worker records it invalid_uri; one bad line never stops the list
                continue
            yield from _expand_local(line, recursive=recursive, file_roots=file_roots, keep=keep,
                                     must_exist=False)
        elif scheme == "s3" and line.endswith("/"):
            if _malformed(lambda u: parse_s3(u, require_key=False), line):
                yield line  # e.g. "s3://": invalid_uri from the worker, not a failed submit
                continue
            yield from _expand_s3(line, recursive=recursive, keep=keep)
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
