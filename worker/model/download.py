"""From a ``weights`` setting to a checkpoint file on this machine: sources and the download cache.

:func:`resolve_source` normalises a setting for a model into a source:

* ``None`` / ``"default"`` / ``"official"``: the registry's official URL (the mirror if that
  fails), downloaded once into ``torch.hub.get_dir()/checkpoints`` and reused from there offline;
* a local path or a ``file://`` URL: used directly;
* an ``http(s)://`` URL: downloaded into the same cache;
* ``"random"``: no file at all (worker.model.checkpoint fills the model deterministically).

Downloads are safe under concurrent processes: an ``fcntl`` lock per cache entry, the bytes go
to a temporary file in the cache folder, the sha256 is checked when known, then ``os.replace``
publishes the file atomically, so a half-written file is never loaded.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from hnq.models import OFFICIAL, RANDOM, weights_key

from .weights import WEIGHTS, WeightsError, logger, provide_hint, weights_entry

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "cache_dir",
    "cache_path",
    "checkpoint_file",
    "download_official",
    "resolve_source",
    "sha256_file",
    "source_sha256",
]

DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _scheme(source: str) -> str:
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    return scheme if len(scheme) > 1 else ""  # "C:\x" is a path, not a URL


def _file_url_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise WeightsError(f"file:// URL with a remote host is not supported: {url}")
    return Path(urllib.request.url2pathname(parts.path))


def resolve_source(name: str, weights: str | None) -> str:
    """Normalise a ``weights`` setting for model ``name`` into a source for
    :func:`checkpoint_file` (and worker.model.checkpoint's loaders).

    Returns the official URL (for None, "default", "official"), ``"random"``, an ``http(s)://``
    or ``file://`` URL as given, or the absolute path of an existing local file.
    """
    entry = weights_entry(name)
    value = weights_key(weights)  # the one spelling rule
    if value == OFFICIAL:
        return entry.url
    if value == RANDOM:
        return RANDOM
    scheme = _scheme(value)
    if scheme in ("http", "https"):
        return value
    if scheme == "file":
        path = _file_url_path(value)
        if not path.is_file():
            raise WeightsError(f"weights file {path} (from {value}) does not exist")
        return value
    if scheme:
        raise WeightsError(
            f"unsupported weights source {value!r}: use a local path, file://, http(s)://, "
            f"'official' or 'random'"
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {provide_hint()}")
    return str(path.resolve())


# --------------------------------------------------------------------------------------------
# Download cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``torch.hub.get_dir()/checkpoints`` (TORCH_HOME moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(url: str) -> Path:
    """The cache file of ``url``: for the registry's official and mirror URLs the basename of its
    path, as torch.hub names it (so a seeded cache serves workers offline); for any other URL
    (a job's ``--weights``) the basename prefixed with a digest of the whole URL, so that
    ``…/v1/model.pth`` and ``…/v2/model.pth`` never share a cache file."""
    base = os.path.basename(urllib.parse.urlsplit(url).path)
    if not base or base in (".", ".."):
        return cache_dir() / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".pth")
    if any(url in w.urls for w in WEIGHTS.values()):
        return cache_dir() / base
    return cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


class _DownloadFailed(Exception):
    """Network-level failure of one URL (the caller may try the next one)."""


class _CacheWriteFailed(Exception):
    """Writing the downloaded bytes into the cache failed (disk full, permissions)."""


def sha256_file(path: Path) -> str:
    """The sha256 of a file, as `sha256sum` prints it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stream(url: str, out, *, progress: bool, timeout: float) -> str:
    """Copy ``url`` into the open file ``out``; return the sha256 of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": "hardnet-queue"})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done, shown = 0, -1
            while chunk := resp.read(_CHUNK):
                try:
                    out.write(chunk)
                except OSError as e:  # the cache's disk, not the network
                    raise _CacheWriteFailed(str(e)) from None
                digest.update(chunk)
                done += len(chunk)
                if progress and total:
                    pct = 100 * done // total
                    if pct // 10 != shown:
                        shown = pct // 10
                        print(f"\rdownloading {url}: {pct}%", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr, flush=True)
            if total is not None and done != total:
                raise _DownloadFailed(f"connection closed after {done} of {total} bytes")
    except urllib.error.HTTPError as e:
        raise _DownloadFailed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _DownloadFailed(f"timed out after {timeout:g} s") from None
        raise _DownloadFailed(str(reason)) from None
    except (TimeoutError, socket.timeout):
        raise _DownloadFailed(f"timed out after {timeout:g} s") from None
    except http.client.IncompleteRead as e:
        raise _DownloadFailed(f"connection closed early ({len(e.partial)} bytes of the last read)") from None
    except (http.client.HTTPException, ValueError, OSError) as e:  # OSError: resets, refusals
        raise _DownloadFailed(f"{type(e).__name__}: {e}") from None
    return digest.hexdigest()


def _sha_mismatch(url: str, expected: str, got: str) -> WeightsError:
    return WeightsError(
        f"sha256 mismatch for {url}: expected {expected}, got {got}; the file was not kept. "
        f"If you trust another copy, {provide_hint()}"
    )


def _download(url: str, dest: Path, sha256: str | None, *, progress: bool, timeout: float) -> Path:
    """Download ``url`` to ``dest`` once, under a per-file lock, atomically."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = open(dest.parent / f"{dest.name}.lock", "a")
    except OSError as e:
        raise WeightsError(f"cannot use the weights cache {dest.parent}: {e}") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed (or we die)
        if dest.is_file():  # another process finished the download while we waited
            return dest
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    got = _stream(url, out, progress=progress, timeout=timeout)
                    out.flush()
                    os.fsync(out.fileno())
                except (_CacheWriteFailed, OSError) as e:
                    raise WeightsError(f"cannot write the weights cache {dest.parent}: {e}") from None
            if sha256 is not None and got != sha256.lower():
                raise _sha_mismatch(url, sha256, got)
            os.replace(tmp_name, dest)
            logger.info("downloaded %s to %s", url, dest)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    return dest


def _cached(url: str, sha256: str | None) -> Path | None:
    path = cache_path(url)
    if not path.is_file():
        return None
    if sha256 is not None and sha256_file(path) != sha256.lower():
        logger.warning("cached %s does not match its sha256: deleting it and downloading again", path)
        path.unlink(missing_ok=True)
        return None
    return path


def _fetch(name: str, url: str, *, progress: bool, timeout: float) -> Path:
    """The cached file for ``url`` (downloading it if needed; the registry mirror as fallback)."""
    entry = WEIGHTS.get(name)
    candidates, sha256 = [url], None
    if entry is not None and url in entry.urls:
        candidates, sha256 = list(entry.urls[entry.urls.index(url):]), entry.sha256
    for candidate in candidates:  # a cached copy wins: no network at all
        if (path := _cached(candidate, sha256)) is not None:
            return path
    failures = []
    for candidate in candidates:
        try:
            return _download(candidate, cache_path(candidate), sha256, progress=progress, timeout=timeout)
        except _DownloadFailed as e:
            logger.warning("could not download %s: %s", candidate, e)
            failures.append(f"  - {candidate}: {e}")
    tried = "\n".join(failures)
    raise WeightsError(
        f"could not download the {name} weights (offline, or the server is unreachable). Tried:\n"
        f"{tried}\n"
        f"Download the file on a machine with internet access, then {provide_hint()}, "
        f"or copy it to {cache_path(candidates[0])} (the download cache is {cache_dir()}; "
        f"TORCH_HOME moves it)."
    )


def download_official(name: str, *, mirror: str | None = None, progress: bool = False,
                      timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Put the official checkpoint of ``name`` into the cache and return its path. ``mirror``:
    the base URL of an internal copy holding the official file names; the file is cached under
    the official name, so workers that ask for the official weights find it offline."""
    entry = weights_entry(name)
    official = cache_path(entry.url)
    path = _cached(entry.url, entry.sha256)
    if path is None and mirror:
        url = mirror.rstrip("/") + "/" + official.name
        try:
            path = _download(url, official, entry.sha256, progress=progress, timeout=timeout)
        except _DownloadFailed as e:
            raise WeightsError(f"could not download {url}: {e}") from None
    if path is None:
        path = _fetch(name, entry.url, progress=progress, timeout=timeout)
    return path


def checkpoint_file(name: str, source: str, *, progress: bool = False,
                    timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[Path, bool]:
    """The local file of ``source`` (a :func:`resolve_source` result other than ``random``) for
    model ``name``, and whether it is a cache entry (a corrupt one is deleted on reading). URLs
    are downloaded lazily into :func:`cache_dir` (once; reused offline)."""
    scheme = _scheme(source)
    if scheme in ("http", "https"):
        return _fetch(name, source, progress=progress, timeout=timeout), True
    if scheme == "file":
        return _file_url_path(source), False
    if scheme:
        raise WeightsError(f"unsupported weights source {source!r}")
    return Path(source).expanduser(), False


def source_sha256(name: str, weights: str | None) -> str | None:
    """The sha256 of the checkpoint file that ``weights`` loads (as `sha256sum` prints it), for
    provenance in logs and manifests; None for ``random`` (no file). Reads the cache, never the
    network, once the weights have been loaded."""
    source = resolve_source(name, weights)
    if source == RANDOM:
        return None
    return sha256_file(checkpoint_file(name, source)[0])
