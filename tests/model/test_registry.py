"""Every list of model names derives from the one registry (hnq.models) and agrees with it."""
from __future__ import annotations

import argparse
import importlib.util
import typing
from pathlib import Path

import torch

from hnq import schema
from hnq.models import MODELS, REGISTRY
from producer.cli import build_parser
from worker.model import hardnet
from worker.model.hardnet import ARCHS
from worker.model.weights import WEIGHTS

REPO_ROOT = Path(__file__).resolve().parents[2]


def hub_entry_points(monkeypatch) -> list[str]:
    # as in test_hubconf: torch.hub's own listing, fed our checkout as the "downloaded" repo
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *a, **k: str(REPO_ROOT))
    return list(torch.hub.list("local/hardnet-queue", trust_repo=True))


def cli_model_choices() -> dict[str, tuple[str, ...]]:
    """Every option or argument of every `hardnet` command that takes a model name."""
    found: dict[str, tuple[str, ...]] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif "--model" in action.option_strings:
                found[f"{path} --model"] = tuple(action.choices or ())
    walk(build_parser(), "hardnet")
    return found


def test_every_list_of_model_names_is_the_registry(monkeypatch):
    assert MODELS == tuple(REGISTRY) and all(REGISTRY[m].name == m for m in MODELS)
    assert typing.get_args(schema.ModelName) == MODELS and schema.MODELS == MODELS
    assert tuple(ARCHS) == MODELS
    assert tuple(WEIGHTS) == MODELS and all(WEIGHTS[m].name == m for m in MODELS)
    assert sorted(hub_entry_points(monkeypatch)) == sorted(MODELS)
    choices = cli_model_choices()
    assert {"hardnet submit --model", "hardnet worker --model", "hardnet classify --model"} <= set(choices)
    assert all(c == MODELS for c in choices.values()), choices
    assert all(callable(getattr(hardnet, m)) for m in MODELS)


def test_hubconf_docstrings_read_the_registry():
    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    for m in MODELS:
        doc = getattr(hub, m).__doc__
        assert doc.startswith(REGISTRY[m].title + " (" + REGISTRY[m].summary + ")")
        assert f"top-1 error {WEIGHTS[m].top1_error} %" in doc and f"top-5 {WEIGHTS[m].top5_error} %" in doc
