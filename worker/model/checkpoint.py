"""Reading a checkpoint into a HarDNet model: safely, strictly, with errors that say what to do.

:func:`load_model` turns a ``weights`` setting into a ready model (worker.model.download finds
the file). A checkpoint is read with ``torch.load(weights_only=True)`` (tensors only, never
arbitrary pickled objects), unwrapped from ``{"state_dict": ...}`` / ``{"model": ...}`` and
``module.`` prefixes, and checked key by key against the model; a checkpoint of another variant
is recognised and named. ``"random"`` weights are a deterministic, RNG-free fill.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from hnq.models import RANDOM

from .download import DOWNLOAD_TIMEOUT_S, checkpoint_file, download_official, resolve_source, sha256_file
from .hardnet import ARCHS, build_hardnet
from .weights import WeightsError, logger, provide_hint, weights_entry

__all__ = [
    "deterministic_state_dict",
    "fill_value",
    "load_model",
    "load_state_dict",
    "load_weights",
    "seed_cache",
    "state_dict_sha256",
]


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
        raise WeightsError(f"weights file {path} does not exist; {provide_hint()}") from None
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
    """Read the checkpoint ``source`` (see worker.model.download.resolve_source) for model
    ``name`` on the CPU.

    URLs are downloaded lazily into the download cache (once; reused offline). Wrappers
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` key prefix are removed.
    """
    weights_entry(name)
    if source == RANDOM:
        raise WeightsError("'random' weights have no state_dict: use load_weights/load_model")
    path, cached = checkpoint_file(name, source, progress=progress, timeout=timeout)
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


def fill_value(key: str, shape: tuple[int, ...], k: int) -> Tensor:
    """The fill of state_dict entry number ``k`` (named ``key``, of ``shape``); tests use it too."""
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
    return {key: fill_value(key, tuple(t.shape), k) for k, (key, t) in enumerate(model.state_dict().items())}


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
    """Build model ``name``, load ``weights`` (see worker.model.download.resolve_source), move it
    to ``device``, and return it in eval mode."""
    source = resolve_source(name, weights)
    model = build_hardnet(name)
    load_weights(model, name, source, progress=progress)
    return model.to(device).eval()


def seed_cache(name: str, *, mirror: str | None = None, progress: bool = False,
               timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[Path, str]:
    """Put the official checkpoint of ``name`` into the cache (`hardnet weights download`), check
    that it loads into the model, and return its path and sha256. ``mirror``: see
    worker.model.download.download_official."""
    path = download_official(name, mirror=mirror, progress=progress, timeout=timeout)
    # A file that is in the cache but does not load would fail every worker: find out now.
    try:
        load_weights(build_hardnet(name), name, str(path))
    except WeightsError:
        path.unlink(missing_ok=True)
        raise
    return path, sha256_file(path)
