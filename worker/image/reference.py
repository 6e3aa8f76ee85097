"""The plain PIL reference of the standard HarDNet transform (PyTorch Hub HarDNet page), for checking
:func:`worker.image.decode.decode_image` + :func:`worker.image.normalize.normalize` against it and for
benchmarks; never on the hot path:

    RGB conversion -> Resize(256) (shorter side, bilinear, antialiased) -> CenterCrop(224)
    -> ToTensor -> Normalize(MEAN, STD)
"""
from __future__ import annotations

import io

import torch
import torchvision.transforms as T
from PIL import Image

from worker.image.decode import to_rgb
from worker.image.normalize import MEAN, STD

__all__ = ["reference_preprocess", "reference_transform"]


def reference_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """The PIL reference: torchvision's own transforms on an RGB PIL image (as the Hub page)."""
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(mean=MEAN, std=STD),
    ])


def reference_preprocess(data: bytes, *, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Normalised float ``[3, crop, crop]`` by the plain PIL path, for checking and documentation."""
    im = Image.open(io.BytesIO(data))
    return reference_transform(resize, crop)(to_rgb(im))
