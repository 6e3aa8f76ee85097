"""hubconf.py through torch.hub's own machinery (local source; nothing from the internet)."""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ["hardnet39ds", "hardnet68", "hardnet68ds", "hardnet85"]


@pytest.fixture
def hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_list_names_exactly_the_four(monkeypatch):
    # torch 2.14's hub.list() has no source= argument (GitHub only): feed it our checkout as the
    # "downloaded" repo; the listing itself is torch.hub's code.
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *a, **k: str(REPO_ROOT))
    assert sorted(torch.hub.list("local/hardnet-queue", trust_repo=True)) == ENTRY_POINTS


def test_hubconf_contents(hubconf):
    assert hubconf.dependencies == ["torch"]
    public = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert public == ENTRY_POINTS
    for name in ENTRY_POINTS:
        fn = getattr(hubconf, name)
        params = inspect.signature(fn).parameters
        assert list(params) == ["pretrained", "kwargs"] and params["pretrained"].default is False
        assert "pretrained" in fn.__doc__ and "top-1" in fn.__doc__


def test_hub_load_local_untrained():
    model = torch.hub.load(str(REPO_ROOT), "hardnet39ds", source="local", num_classes=7)
    assert model.classifier.out_features == 7
    model = torch.hub.load(str(REPO_ROOT), "hardnet68ds", source="local", trust_repo=True)
    assert model.classifier.out_features == 1000


def test_hub_load_local_pretrained_from_env(monkeypatch, ckpt_39ds, state_dict_39ds):
    monkeypatch.setenv("HARDNET_WEIGHTS", ckpt_39ds.as_uri())
    model = torch.hub.load(str(REPO_ROOT), "hardnet39ds", source="local", pretrained=True)
    assert not model.training
    got = model.state_dict()
    assert list(got) == list(state_dict_39ds)
    assert all(torch.equal(got[k], state_dict_39ds[k]) for k in got)


def test_pretrained_without_weights_is_a_clear_offline_error(hubconf, monkeypatch, dead_url):
    import dataclasses

    from worker.model.weights import WEIGHTS, WeightsError

    entry = dataclasses.replace(WEIGHTS["hardnet39ds"], url=dead_url, mirror=None)
    monkeypatch.setitem(WEIGHTS, "hardnet39ds", entry)
    with pytest.raises(WeightsError, match="HARDNET_WEIGHTS"):
        hubconf.hardnet39ds(pretrained=True)


def test_pretrained_other_num_classes(hubconf):
    with pytest.raises(ValueError, match="num_classes=10 needs pretrained=False"):
        hubconf.hardnet68(pretrained=True, num_classes=10)
    with pytest.raises(ValueError):
        torch.hub.load(str(REPO_ROOT), "hardnet85", source="local", pretrained=True, num_classes=2)


def test_pretrained_1000_classes_is_fine(hubconf, monkeypatch, ckpt_39ds):
    monkeypatch.setenv("HARDNET_WEIGHTS", str(ckpt_39ds))
    assert hubconf.hardnet39ds(pretrained=True, num_classes=1000).classifier.out_features == 1000


def test_random_weights_via_env(hubconf, monkeypatch):
    monkeypatch.setenv("HARDNET_WEIGHTS", "random")
    with pytest.warns(UserWarning, match="meaningless"):
        hubconf.hardnet39ds(pretrained=True)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_unknown_kwargs(hubconf, name):
    with pytest.raises(TypeError, match="weights_path"):
        getattr(hubconf, name)(weights_path="x")
    with pytest.raises(TypeError):
        getattr(hubconf, name)(False, 1000)  # num_classes is keyword-only
