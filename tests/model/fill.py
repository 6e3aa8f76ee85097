"""Deterministic (RNG-free) weight fill and input of tests/fixtures/hardnet/README.md.

Written from the README's description; used to compare our HarDNet with the reference logits.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# The fill itself lives with the weights (it is what weights="random" loads); the tests use that one.
from worker.model.checkpoint import fill_value  # noqa: E402
from worker.model.checkpoint import deterministic_state_dict  # noqa: E402,F401


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
