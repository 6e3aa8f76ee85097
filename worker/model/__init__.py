"""HarDNet models (torch only): the network (hardnet), its published weights (weights: the
registry, with preprocessing and categories), getting a checkpoint file (download) and loading it
(checkpoint). The names of the variants are hnq.models.MODELS."""
from .checkpoint import load_model, load_state_dict, load_weights, seed_cache, state_dict_sha256
from .download import cache_dir, cache_path, resolve_source, source_sha256
from .hardnet import (
    ARCHS,
    HarDNet,
    HarDNetConfig,
    UnknownModelError,
    build_hardnet,
    list_models,
)
from .labels import IMAGENET_CATEGORIES
from .weights import (
    WEIGHTS,
    Preprocess,
    Weights,
    WeightsError,
    preprocess_for,
    weights_entry,
    weights_from_env,
)

__all__ = [
    "ARCHS",
    "IMAGENET_CATEGORIES",
    "WEIGHTS",
    "HarDNet",
    "HarDNetConfig",
    "Preprocess",
    "UnknownModelError",
    "Weights",
    "WeightsError",
    "build_hardnet",
    "cache_dir",
    "cache_path",
    "list_models",
    "load_model",
    "load_state_dict",
    "load_weights",
    "preprocess_for",
    "resolve_source",
    "seed_cache",
    "source_sha256",
    "state_dict_sha256",
    "weights_entry",
    "weights_from_env",
]
