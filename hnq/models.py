"""The HarDNet variants this project serves, and the one rule for spelling a weights setting.

One registry both sides read, so that a variant is named in one place: the producer checks
``--model`` against :data:`MODELS` (every CLI ``--model`` takes its choices from here), the
message schema types a chunk's model with it (``hnq.schema.ModelName``), and the worker keys its
architectures (``worker.model.hardnet.ARCHS``), its published checkpoints
(``worker.model.weights.WEIGHTS``) and ``hubconf.py``'s entry points by it
(tests/model/test_registry.py checks that they agree).

Dependency-free on purpose: the producer imports it without torch, and ``hubconf.py`` (which
declares ``dependencies = ["torch"]``) reaches it through the model package, so it must not need
pydantic either. That is also why the weights spelling rule, :func:`weights_key`, lives here
rather than in ``hnq.options`` (which validates a job's ``--weights`` with it).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "OFFICIAL",
    "RANDOM",
    "REGISTRY",
    "WEIGHTS_WORDS",
    "ModelInfo",
    "weights_key",
]


@dataclass(frozen=True)
class ModelInfo:
    """What anyone may know about a variant without torch."""

    name: str  # `--model`, the hub entry point, the key of ARCHS and WEIGHTS
    title: str  # as the paper writes it
    summary: str  # its size in a few words (hub docstrings; tests/fixtures/hardnet/README.md has the table)


#: the variants, smallest first (the order of ``--help``, ARCHS and WEIGHTS)
REGISTRY: dict[str, ModelInfo] = {m.name: m for m in (
    ModelInfo("hardnet39ds", "HarDNet-39DS", "depthwise-separable; 3.5 M params, 0.43 GMACs"),
    ModelInfo("hardnet68ds", "HarDNet-68DS", "depthwise-separable; 4.2 M params, 0.78 GMACs"),
    ModelInfo("hardnet68", "HarDNet-68", "17.6 M params, 4.2 GMACs"),
    ModelInfo("hardnet85", "HarDNet-85", "36.7 M params, 9.1 GMACs"),
)}

#: the names alone, for ``choices=`` and ``Literal[...]``
MODELS: tuple[str, ...] = tuple(REGISTRY)

#: the variant used when nothing names one (settings, `--model` defaults, jobs stored without one)
DEFAULT_MODEL = "hardnet68"


# -- the weights spelling rule -------------------------------------------------------------------
#: `--weights` / HARDNET_WEIGHTS values that name no file: the variant's published checkpoint, or
#: the deterministic untrained fill
OFFICIAL = "official"
RANDOM = "random"
WEIGHTS_WORDS = (OFFICIAL, RANDOM)


def weights_key(value: str | None) -> str:
    """THE spelling of a weights setting, one per checkpoint: None, blank, "default" and
    "official" (any case, surrounding blanks ignored) are ``"official"``; "random" (any case) is
    ``"random"``; anything else (a path or URL) is returned stripped, case kept.

    Every reader of a weights setting goes through this: the job option's validation
    (``hnq.options.normalize_weights``), the worker's engine cache key and its check of what a job
    may load (``worker.engine_pool``), the loader (``worker.model.download.resolve_source``) and
    what records say (``worker.engine.classifier.describe_weights``).
    """
    v = "" if value is None else str(value).strip()
    low = v.lower()
    if low in ("", "default", OFFICIAL):
        return OFFICIAL
    if low == RANDOM:
        return RANDOM
    return v
