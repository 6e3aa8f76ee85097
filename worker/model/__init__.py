"""HarDNet models, their ImageNet labels and pretrained-weights registry (torch only)."""
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
    load_model,
    load_state_dict,
    load_weights,
    resolve_source,
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
    "list_models",
    "load_model",
    "load_state_dict",
    "load_weights",
    "resolve_source",
    "weights_from_env",
]
