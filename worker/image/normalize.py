"""Normalisation of uint8 image batches, on the device: ``(x/255 - mean)/std``, the last step of the
standard transform (after ToTensor). Decoding stops at uint8 on purpose: uint8 is 4x smaller than
fp32 through process pipes and host-to-device copies, so the whole batch is normalised where the
model runs (worker.engine.device).

``mean`` and ``std`` belong to the model's weights entry (``worker.model.weights.preprocess_for``);
the runner passes them. :data:`MEAN` / :data:`STD`, the defaults, are the registry's own default
preprocessing (every published HarDNet checkpoint's: ImageNet's), not a copy of it."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from worker.model.weights import Preprocess

__all__ = ["MEAN", "STD", "normalize"]

MEAN: tuple[float, float, float] = Preprocess().mean
STD: tuple[float, float, float] = Preprocess().std


@lru_cache(maxsize=64)
def _affine(device: torch.device, dtype: torch.dtype, mean: tuple, std: tuple):
    s = torch.tensor([1.0 / (255.0 * v) for v in std], dtype=torch.float64)
    b = torch.tensor([-m / v for m, v in zip(mean, std)], dtype=torch.float64)
    return (s.to(device=device, dtype=dtype).view(-1, 1, 1),
            b.to(device=device, dtype=dtype).view(-1, 1, 1))


def normalize(batch: torch.Tensor, *, dtype: torch.dtype = torch.float32,
              mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` (or ``[3,H,W]``), any device and memory format -> ``(x/255 - mean)/std``
    as ``dtype``, keeping the input's memory format (channels_last stays channels_last).
    Half-precision outputs are computed in fp32 and rounded once."""
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 tensor, got {batch.dtype}")
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    scale, bias = _affine(batch.device, work, tuple(float(m) for m in mean), tuple(float(s) for s in std))
    x = batch.to(dtype=work)            # preserve_format: keeps channels_last
    x.mul_(scale).add_(bias)
    return x if work == dtype else x.to(dtype=dtype)
