"""Pretrained HarDNet weights: the registry, data next to the code.

``WEIGHTS[name]`` is one published checkpoint of a variant, torchvision style: where it lives
(url, mirror, sha256), how good it is (top-1/top-5 error) and what it expects and means: its
:class:`Preprocess` (resize, crop, mean, std) and its ``categories`` (the class names, index =
classifier output). Code that preprocesses images or names labels reads them from here, through
:func:`weights_entry` / :func:`preprocess_for`, never from constants of its own: the checkpoint
owns them.

The rest of the weights story lives beside this module:
:mod:`worker.model.download` turns a ``weights`` setting into a local file (sources, the download
cache), :mod:`worker.model.checkpoint` reads that file into a model (``load_model``).

Only entry points (CLI, worker startup, ``hubconf.py``) read the ``HARDNET_WEIGHTS``
environment variable, through :func:`weights_from_env`; deeper code gets the value passed in.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hnq.errors import ConfigError
from hnq.models import MODELS

from .hardnet import UnknownModelError
from .labels import IMAGENET_CATEGORIES

__all__ = [
    "ENV_VAR",
    "WEIGHTS",
    "Preprocess",
    "Weights",
    "WeightsError",
    "logger",
    "preprocess_for",
    "provide_hint",
    "weights_entry",
    "weights_from_env",
]

#: one logger for everything about weights (registry, download, loading): the name operators
#: filter on (worker.model.download and worker.model.checkpoint log through it too)
logger = logging.getLogger(__name__)

ENV_VAR = "HARDNET_WEIGHTS"


class WeightsError(ConfigError):
    """Weights could not be found, downloaded, read or matched to the model."""


def provide_hint() -> str:
    """How to give a worker weights by hand (ends several error messages)."""
    return (
        f"set {ENV_VAR}=/path/to/file.pth or pass --weights /path/to/file.pth "
        f"(a file:// or http(s):// URL works too)"
    )


@dataclass(frozen=True)
class Preprocess:
    """Eval transform of the published models: Resize(resize) -> CenterCrop(crop) -> Normalize.

    ``mean`` and ``std`` are per RGB channel on the 0..1 scale (torchvision's ``Normalize``);
    worker.image.normalize.normalize takes them as its ``mean=`` / ``std=``."""

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


_SITE = "https://ping-chao.com/hardnet/"
_MIRROR = "https://github.com/PingoLH/Pytorch-HarDNet/raw/master/"


def _published(name: str, tag: str, top1_error: float, top5_error: float, mirrored: bool) -> Weights:
    """The entry of a checkpoint published as ``{name}-{tag}.pth`` (and as ``{name}.pth`` on the
    GitHub mirror when ``mirrored``)."""
    return Weights(name, f"{_SITE}{name}-{tag}.pth", f"{_MIRROR}{name}.pth" if mirrored else None,
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


def weights_entry(name: str) -> Weights:
    """The registry entry of model ``name`` (UnknownModelError for a name not in the registry).

    Any checkpoint of a variant, a job's own included, is fed and read as the published one:
    a job-named file carries no preprocessing or category metadata of its own."""
    try:
        return WEIGHTS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(name) from None


def preprocess_for(name: str) -> Preprocess:
    """How images must be prepared for model ``name``: ``preprocess_for(m).mean`` / ``.std``
    for Normalize, ``.resize`` / ``.crop`` for the geometry."""
    return weights_entry(name).preprocess
