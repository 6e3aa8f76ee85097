"""`hardnet exporter` — placeholder until the metrics work lands (see issue 9)."""
from __future__ import annotations


def register(sub) -> None:
    return None
