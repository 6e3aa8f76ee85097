"""The 1000 ImageNet-1k category names, index = class id of the HarDNet classifier.

Data, not code: ``imagenet_categories.txt`` beside this module, one name per line (UTF-8), read
once at import. It is torchvision 0.29.1's ``torchvision.models._meta._IMAGENET_CATEGORIES``
verbatim, kept here so that the model package (and ``hubconf.py``) needs only torch at run time.
It differs from the classic ``imagenet_classes.txt`` of pytorch/hub only where that file repeats
a name: index 134 is "crane bird" (txt: "crane") and 639 is "maillot tank suit" (txt: "maillot").

Code reads the categories through the weights entry (``weights_entry(model).categories``): a
checkpoint owns the meaning of its classifier's outputs.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["CATEGORIES_FILE", "IMAGENET_CATEGORIES"]

#: shipped as package data (pyproject: ``[tool.setuptools.package-data] "*" = ["*.txt", ...]``)
CATEGORIES_FILE = Path(__file__).with_name("imagenet_categories.txt")

IMAGENET_CATEGORIES: list[str] = CATEGORIES_FILE.read_text(encoding="utf-8").splitlines()

if len(IMAGENET_CATEGORIES) != 1000 or len(set(IMAGENET_CATEGORIES)) != 1000:
    raise RuntimeError(f"{CATEGORIES_FILE} must hold 1000 distinct category names, one per line")
