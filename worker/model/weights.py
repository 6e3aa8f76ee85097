"""Pretrained HarDNet weights: the registry (data next to the code) and a safe loader.

``WEIGHTS[name]`` says where a variant's published checkpoint lives, how good it is and how
its inputs must be preprocessed. :func:`load_model` turns a ``weights`` string into a ready
model:

* ``None`` / ``"default"`` / ``"official"``: the official URL (the mirror if that fails),
  downloaded once into ``torch.hub.get_dir()/checkpoints`` and reused from there offline;
* a local path or a ``file://`` URL: loaded directly;
* an ``http(s)://`` URL: downloaded into the same cache;
* ``"random"``: untrained weights, with a loud warning (labels are meaningless).

Downloads are safe under concurrent processes: an ``fcntl`` lock per cache entry, the bytes go
to a temporary file in the cache folder, the sha256 is checked when known, then ``os.replace``
publishes the file atomically, so a half-written file is never loaded.

Only entry points (CLI, worker startup, ``hubconf.py``) read the ``HARDNET_WEIGHTS``
environment variable, through :func:`weights_from_env`; deeper code gets the value passed in.
"""
from __future__ import annotations

import math

import fcntl
import hashlib
import http.client
import logging
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hnq.errors import ConfigError
from hnq.models import MODELS, OFFICIAL, RANDOM, weights_key

from .hardnet import ARCHS, UnknownModelError, build_hardnet
from .labels import IMAGENET_CATEGORIES

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "ENV_VAR",
    "RANDOM",
    "WEIGHTS",
    "Preprocess",
    "Weights",
    "WeightsError",
    "cache_dir",
    "cache_path",
    "load_model",
    "load_state_dict",
    "load_weights",
    "resolve_source",
    "weights_from_env",
]

logger = logging.getLogger(__name__)

ENV_VAR = "HARDNET_WEIGHTS"
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
_CHUNK = 1 << 20


class WeightsError(ConfigError):
    """Weights could not be found, downloaded, read or matched to the model."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Eval transform of the published models: Resize(resize) -> CenterCrop(crop) -> Normalize."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Weights:
    """One published checkpoint of a variant."""

    name: str
    url: str
    mirror: str | None
    sha256: str | None  # None: not published; the check runs whenever it is set
    top1_error: float  # ImageNet-1k val, single 224 crop, percent (as published)
    top5_error: float
    preprocess: Preprocess = Preprocess()
    categories: tuple[str, ...] = tuple(IMAGENET_CATEGORIES)

    @property
    def urls(self) -> tuple[str, ...]:
        """Where to download from, in order of preference."""
        return (self.url,) if self.mirror is None else (self.url, self.mirror)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def top1_accuracy(self) -> float:
        return round(100.0 - self.top1_error, 2)

    @property
    def top5_accuracy(self) -> float:
        return round(100.0 - self.top5_error, 2)


_OFFICIAL = "https://ping-chao.com/hardnet/"
_MIRROR = "https://github.com/PingoLH/Pytorch-HarDNet/raw/master/"

def _published(name: str, tag: str, top1_error: float, top5_error: float, mirrored: bool) -> Weights:
    """The entry of a checkpoint published as ``{name}-{tag}.pth`` (and as ``{name}.pth`` on the
    GitHub mirror when ``mirrored``)."""
    return Weights(name, f"{_OFFICIAL}{name}-{tag}.pth", f"{_MIRROR}{name}.pth" if mirrored else None,
                   None, top1_error=top1_error, top5_error=top5_error)


#: one row per variant, in hnq.models.MODELS order (the comment names each): the official file's
#: tag, its published top-1 and top-5 error, whether the GitHub mirror has it
WEIGHTS: dict[str, Weights] = {name: _published(name, *row) for name, row in zip(MODELS, (
    ("0e6c6fa9", 27.92, 9.57, True),  # hardnet39ds
    ("632474d2", 25.71, 8.13, True),  # hardnet68ds
    ("5d684880", 23.52, 6.99, True),  # hardnet68
    ("a28faa00", 21.96, 6.11, False),  # hardnet85
), strict=True)}


def weights_from_env() -> str | None:
    """The ``HARDNET_WEIGHTS`` setting, or None when unset or blank (entry points only)."""
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None


def _entry(name: str) -> Weights:
    try:
        return WEIGHTS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(name) from None


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


def _provide_hint() -> str:
    return (
        f"set {ENV_VAR}=/path/to/file.pth or pass --weights /path/to/file.pth "
        f"(a file:// or http(s):// URL works too)"
    )


def resolve_source(name: str, weights: str | None) -> str:
    """Normalise a ``weights`` setting for model ``name`` into a source for :func:`load_state_dict`.

    Returns the official URL (for None, "default", "official"), ``"random"``, an ``http(s)://``
    or ``file://`` URL as given, or the absolute path of an existing local file.
    """
    entry = _entry(name)
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
        raise WeightsError(f"weights file {path} does not exist; {_provide_hint()}")
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


def _sha256_file(path: Path) -> str:
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
        f"If you trust another copy, {_provide_hint()}"
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
    if sha256 is not None and _sha256_file(path) != sha256.lower():
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
        f"Download the file on a machine with internet access, then {_provide_hint()}, "
        f"or copy it to {cache_path(candidates[0])} (the download cache is {cache_dir()}; "
        f"TORCH_HOME moves it)."
    )


def seed_cache(name: str, *, mirror: str | None = None, progress: bool = False,
               timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[Path, str]:
    """Put the official checkpoint of ``name`` into the cache (`hardnet weights download`), check
    that it loads into the model, and return its path and sha256. ``mirror``: the base URL of an
    internal copy holding the official file names; the file is cached under the official name,
    so workers that ask for the official weights find it offline."""
    entry = _entry(name)
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
    # A file that is in the cache but does not load would fail every worker: find out now.
    try:
        load_weights(build_hardnet(name), name, str(path))
    except WeightsError:
        path.unlink(missing_ok=True)
        raise
    return path, _sha256_file(path)


def source_sha256(name: str, weights: str | None) -> str | None:
    """The sha256 of the checkpoint file that ``weights`` loads (as `sha256sum` prints it), for
    provenance in logs and manifests; None for ``random`` (no file). Reads the cache, never the
    network, once the weights have been loaded."""
    source = resolve_source(name, weights)
    if source == RANDOM:
        return None
    scheme = _scheme(source)
    if scheme in ("http", "https"):
        path = _fetch(name, source, progress=False, timeout=DOWNLOAD_TIMEOUT_S)
    elif scheme == "file":
        path = _file_url_path(source)
    else:
        path = Path(source)
    return _sha256_file(path)


def state_dict_sha256(model: nn.Module) -> str:
    """A digest of the tensors a model holds (names, shapes, dtypes, bytes, in key order): the
    provenance of weights that come from no file (``random``)."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------


def _read(path: Path, *, cached: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} does not exist; {_provide_hint()}") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError...
        text = str(e)
        if "Unsupported global" in text:
            raise WeightsError(
                f"weights file {path} holds Python objects other than tensors; refusing to unpickle it "
                f"(torch.load weights_only=True). Save just the model's state_dict."
            ) from None
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        note = ""
        if cached:
            path.unlink(missing_ok=True)
            note = " The bad cache entry was deleted: the next try downloads it again."
        raise WeightsError(
            f"weights file {path} is corrupt or truncated, not a readable PyTorch checkpoint "
            f"({type(e).__name__}: {first}).{note}"
        ) from None


def _unwrap(obj: object, path: object) -> dict[str, Tensor]:
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, possibly nested
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not contain a state_dict of tensors")
    sd = {str(k): v for k, v in obj.items()}
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP, torch.compile
        while all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict(
    name: str, source: str, *, progress: bool = False, timeout: float = DOWNLOAD_TIMEOUT_S
) -> dict[str, Tensor]:
    """Read the checkpoint ``source`` (see :func:`resolve_source`) for model ``name`` on the CPU.

    URLs are downloaded lazily into :func:`cache_dir` (once; reused offline). Wrappers
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` key prefix are removed.
    """
    _entry(name)
    if source == RANDOM:
        raise WeightsError("'random' weights have no state_dict: use load_weights/load_model")
    scheme = _scheme(source)
    if scheme in ("http", "https"):
        path, cached = _fetch(name, source, progress=progress, timeout=timeout), True
    elif scheme == "file":
        path, cached = _file_url_path(source), False
    elif scheme:
        raise WeightsError(f"unsupported weights source {source!r}")
    else:
        path, cached = Path(source).expanduser(), False
    return _unwrap(_read(path, cached=cached), path)


# --------------------------------------------------------------------------------------------
# Matching a checkpoint to a model
# --------------------------------------------------------------------------------------------


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _shapes(sd: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if not _is_counter(k)}


def _head_prefix(model: nn.Module) -> str:
    return f"base.{len(model.base) - 1}."


def _guess_arch(sd: Mapping[str, Tensor]) -> str | None:
    """The variant whose layout the checkpoint has, ignoring the classifier's width; or None."""
    shapes = _shapes(sd)
    for arch in ARCHS:
        with torch.device("meta"):
            ref_model = build_hardnet(arch)
        ref, head = _shapes(ref_model.state_dict()), _head_prefix(ref_model)
        if ref.keys() == shapes.keys() and all(ref[k] == shapes[k] or k.startswith(head) for k in ref):
            return arch
    return None


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > n else shown


def _check_fits(model: nn.Module, sd: Mapping[str, Tensor], name: str, source: str) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd and not _is_counter(k)]
    unexpected = [k for k in sd if k not in want]
    mismatched = [
        f"{k} (checkpoint {list(sd[k].shape)}, model {list(want[k].shape)})"
        for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"the checkpoint {source} does not fit {name}:"]
    if missing:
        lines.append(f"  missing keys: {_few(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_few(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches: {_few(mismatched, 3)}")
    guess = _guess_arch(sd)
    if guess is not None and guess != name:
        lines.append(f"It looks like a {guess} checkpoint: choose model {guess} or other weights.")
    elif guess == name:
        lines.append("Only the classifier differs: the checkpoint was trained for another number of classes.")
    raise WeightsError("\n".join(lines))


# -- "random" weights -----------------------------------------------------------------------------
# Not torch's random init: a deterministic, RNG-free fill (the one tests/fixtures/hardnet/README.md
# specifies). Every worker then holds the same "random" model, so a chunk retried on another worker
# gets the same labels, and the logits depend on the input (a default init with fresh BN stats gives
# nearly the same top-5 for every image, which makes a demo look broken).
_FILL_P = 1000003


def _fill_value(key: str, shape: tuple[int, ...], k: int) -> Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.int64)
    z = 2.0 * ((((k + 1) * i * i + 618034 * i + 314159 * k) % _FILL_P).to(torch.float64) / _FILL_P) - 1.0
    if len(shape) >= 2:
        g = 1.2 if (len(shape) == 4 and shape[1] == 1) else 1.7  # depthwise convs get a smaller gain
        v = (g * math.sqrt(3.0 / (n // shape[0]))) * z
    else:
        mul, add = {"running_mean": (0.05, 0.0), "running_var": (0.25, 1.25),
                    "weight": (0.1, 1.0), "bias": (0.1, 0.0)}[key.rsplit(".", 1)[1]]
        v = add + mul * z
    return v.to(torch.float32).reshape(shape)


def deterministic_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The deterministic fill for ``model``'s state_dict (same keys, shapes and order)."""
    return {key: _fill_value(key, tuple(t.shape), k) for k, (key, t) in enumerate(model.state_dict().items())}


def _warn_random(name: str) -> None:
    msg = (
        f"{name}: using RANDOM, untrained weights (weights='random', a deterministic fill): every "
        f"label it predicts is meaningless. Use this only for tests and smoke runs."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)
    logger.warning(msg)


def load_weights(model: nn.Module, name: str, source: str, *, progress: bool = False) -> nn.Module:
    """Load ``source`` into ``model`` (strictly; missing ``num_batches_tracked`` are accepted).

    ``source`` is anything :func:`resolve_source` accepts (resolving is idempotent).
    """
    source = resolve_source(name, source)
    if source == RANDOM:
        _warn_random(name)
        model.load_state_dict(deterministic_state_dict(model), strict=True)
        return model
    sd = load_state_dict(name, source, progress=progress)
    _check_fits(model, sd, name, source)
    own = model.state_dict()
    for key in own:
        if _is_counter(key) and key not in sd:  # checkpoints of old torch lack them
            sd[key] = torch.zeros_like(own[key])
    model.load_state_dict(sd, strict=True)
    return model


def load_model(name: str, weights: str | None = None, *, device: str | torch.device = "cpu",
               progress: bool = False) -> nn.Module:
    """Build model ``name``, load ``weights`` (see :func:`resolve_source`), move it to ``device``,
    and return it in eval mode."""
    source = resolve_source(name, weights)
    model = build_hardnet(name)
    load_weights(model, name, source, progress=progress)
    return model.to(device).eval()
