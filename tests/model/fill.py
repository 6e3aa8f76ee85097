"""Deterministic (RNG-free) weight fill and input of tests/fixtures/hardnet/README.md.

Written from the README's description; used to compare our HarDNet with the reference logits.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_P = 1000003


def _z(k: int, n: int) -> torch.Tensor:
    """z in [-1, 1) for the k-th state_dict entry with n elements (float64, exact int64 maths)."""
    i = torch.arange(n, dtype=torch.int64)
    r = ((k + 1) * i * i + 618034 * i + 314159 * k) % _P
    return 2.0 * (r.to(torch.float64) / float(_P)) - 1.0


def fill_value(key: str, shape: tuple[int, ...] | torch.Size, k: int) -> torch.Tensor:
    """The value of the k-th state_dict entry ``key`` of the given shape."""
    shape = tuple(shape)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    n = math.prod(shape)
    z = _z(k, n)
    if len(shape) >= 2:
        g = 1.2 if (len(shape) == 4 and shape[1] == 1) else 1.7
        v = (g * math.sqrt(3.0 / (n // shape[0]))) * z
    else:
        leaf = key.rsplit(".", 1)[1]
        mul, add = {"running_mean": (0.05, 0.0), "running_var": (0.25, 1.25),
                    "weight": (0.1, 1.0), "bias": (0.1, 0.0)}[leaf]
        v = add + mul * z
    return v.to(torch.float32).reshape(shape)


def deterministic_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict with the same keys/shapes as ``model``'s, filled deterministically."""
    return {key: fill_value(key, t.shape, k) for k, (key, t) in enumerate(model.state_dict().items())}


def fill_(model: nn.Module) -> nn.Module:
    """Load the deterministic fill into ``model`` in place; returns the model."""
    model.load_state_dict(deterministic_state_dict(model), strict=True)
    return model


def make_input(b: int = 2, h: int = 224, w: int = 224) -> torch.Tensor:
    """x[b,c,h,w] = 1.5*sin(0.01*(h*W+w) + 0.5*c + 1.1*b), computed in float64, cast to float32."""
    hw = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    c = torch.arange(3, dtype=torch.float64).reshape(1, 3, 1, 1)
    bb = torch.arange(b, dtype=torch.float64).reshape(b, 1, 1, 1)
    return (1.5 * torch.sin(0.01 * hw + 0.5 * c + 1.1 * bb)).to(torch.float32)
