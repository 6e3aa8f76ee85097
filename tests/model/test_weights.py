"""Weights registry and loader. Never touches the internet: loopback HTTP and file:// only."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hnq.errors import ConfigError
from worker.model import ARCHS, build_hardnet
from worker import model as W
from worker.model.labels import IMAGENET_CATEGORIES
from worker.model.weights import WEIGHTS, Preprocess, WeightsError

NAME = "hardnet39ds"
REPO_ROOT = Path(__file__).resolve().parents[2]


def same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def ckpt_bytes(ckpt_39ds) -> bytes:
    return ckpt_39ds.read_bytes()


@pytest.fixture
def official(monkeypatch, http_server, ckpt_bytes):
    """Point the hardnet39ds registry entry at the loopback server (official file, no mirror)."""
    url = http_server.add("/hardnet/hardnet39ds-0e6c6fa9.pth", ckpt_bytes)
    monkeypatch.setitem(WEIGHTS, NAME, dataclasses.replace(WEIGHTS[NAME], url=url, mirror=None))
    return url


def save(tmp_path, obj, name="ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list(ARCHS))
def test_registry_entry(name):
    w = WEIGHTS[name]
    assert w.name == name
    assert w.url.startswith("https://ping-chao.com/hardnet/" + name + "-") and w.url.endswith(".pth")
    if name == "hardnet85":
        assert w.mirror is None and w.urls == (w.url,)
    else:
        assert w.mirror == f"https://github.com/PingoLH/Pytorch-HarDNet/raw/master/{name}.pth"
        assert w.urls == (w.url, w.mirror)
    assert w.sha256 is None
    assert 20 < w.top1_error < 30 and 5 < w.top5_error < 10
    assert w.top1_accuracy == round(100 - w.top1_error, 2)
    assert w.preprocess == Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    assert list(w.categories) == IMAGENET_CATEGORIES and w.num_classes == 1000
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.url = "x"


def test_registry_values():
    assert {k: (w.top1_error, w.top5_error) for k, w in WEIGHTS.items()} == {
        "hardnet39ds": (27.92, 9.57), "hardnet68ds": (25.71, 8.13),
        "hardnet68": (23.52, 6.99), "hardnet85": (21.96, 6.11)}
    assert [os.path.basename(w.url) for w in WEIGHTS.values()] == [
        "hardnet39ds-0e6c6fa9.pth", "hardnet68ds-632474d2.pth", "hardnet68-5d684880.pth", "hardnet85-a28faa00.pth"]
    assert list(WEIGHTS) == list(ARCHS)
    assert issubclass(WeightsError, ConfigError)


def test_weights_from_env(monkeypatch):
    assert W.weights_from_env() is None
    monkeypatch.setenv("HARDNET_WEIGHTS", "  ")
    assert W.weights_from_env() is None
    monkeypatch.setenv("HARDNET_WEIGHTS", "/x/y.pth ")
    assert W.weights_from_env() == "/x/y.pth"


# ---------------------------------------------------------------------------- resolve_source


@pytest.mark.parametrize("value", [None, "", "default", "official", "OFFICIAL"])
def test_resolve_official(value):
    assert W.resolve_source("hardnet68", value) == WEIGHTS["hardnet68"].url


def test_resolve_other_sources(tmp_path, ckpt_39ds, monkeypatch):
    assert W.resolve_source(NAME, "random") == "random"
    assert W.resolve_source(NAME, "https://example.invalid/a.pth") == "https://example.invalid/a.pth"
    assert W.resolve_source(NAME, "http://127.0.0.1:1/a.pth") == "http://127.0.0.1:1/a.pth"
    assert W.resolve_source(NAME, ckpt_39ds.as_uri()) == ckpt_39ds.as_uri()
    assert W.resolve_source(NAME, str(ckpt_39ds)) == str(ckpt_39ds)
    monkeypatch.chdir(ckpt_39ds.parent)
    assert W.resolve_source(NAME, ckpt_39ds.name) == str(ckpt_39ds)  # made absolute


def test_resolve_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*HARDNET_WEIGHTS=/path/to/file.pth"):
        W.resolve_source(NAME, str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        W.resolve_source(NAME, (tmp_path / "nope.pth").as_uri())
    with pytest.raises(WeightsError, match="unsupported"):
        W.resolve_source(NAME, "ftp://host/x.pth")
    with pytest.raises(ValueError, match="unknown HarDNet model"):
        W.resolve_source("hardnet99", None)


# ---------------------------------------------------------------------------- local files


def test_load_plain_path_and_file_url(ckpt_39ds, state_dict_39ds):
    assert same_tensors(W.load_state_dict(NAME, str(ckpt_39ds)), state_dict_39ds)
    assert same_tensors(W.load_state_dict(NAME, ckpt_39ds.as_uri()), state_dict_39ds)
    assert not W.cache_dir().exists()  # local files are not copied into the cache


def test_load_model_from_file(ckpt_39ds, state_dict_39ds):
    model = W.load_model(NAME, ckpt_39ds.as_uri())
    assert not model.training
    assert same_tensors(model.state_dict(), state_dict_39ds)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("wrap", ["module", "state_dict", "model", "state_dict+module", "compiled"])
def test_wrapped_checkpoints(tmp_path, state_dict_39ds, wrap):
    sd = state_dict_39ds
    if "module" in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrap == "compiled":
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    if wrap.startswith("state_dict"):
        sd = {"state_dict": sd, "epoch": 90, "best_acc1": torch.tensor(72.1)}
    if wrap == "model":
        sd = {"model": sd, "optimizer": {"lr": 0.1}}
    path = save(tmp_path, sd)
    assert same_tensors(W.load_state_dict(NAME, str(path)), state_dict_39ds)
    model = W.load_model(NAME, str(path))
    assert same_tensors(model.state_dict(), state_dict_39ds)


def test_checkpoint_without_num_batches_tracked(tmp_path, state_dict_39ds):
    sd = {k: v for k, v in state_dict_39ds.items() if not k.endswith("num_batches_tracked")}
    assert len(sd) < len(state_dict_39ds)
    model = W.load_model(NAME, str(save(tmp_path, sd)))
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == 0
        else:
            assert torch.equal(v, state_dict_39ds[k])


def test_other_variant_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = save(tmp_path, build_hardnet("hardnet68ds").state_dict())
    with pytest.raises(WeightsError) as info:
        W.load_model(NAME, str(path))
    msg = str(info.value)
    assert "does not fit hardnet39ds" in msg
    assert "missing keys: base.8.dwconv.weight, " in msg and "(134 in all)" in msg
    assert "unexpected keys: base.3.layers.4.layer1.conv.weight, " in msg and "(502 in all)" in msg
    assert "shape mismatches: base.0.conv.weight (checkpoint [32, 3, 3, 3], model [24, 3, 3, 3])" in msg
    assert "looks like a hardnet68ds checkpoint" in msg


def test_missing_keys_named(tmp_path, state_dict_39ds):
    sd = dict(state_dict_39ds)
    del sd["base.14.3.bias"], sd["base.3.layers.0.layer1.conv.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        W.load_model(NAME, str(save(tmp_path, sd)))
    msg = str(info.value)
    assert "missing keys: base.3.layers.0.layer1.conv.weight, base.14.3.bias" in msg
    assert "unexpected keys: extra.weight" in msg


def test_other_num_classes_hint(tmp_path):
    torch.manual_seed(0)
    path = save(tmp_path, build_hardnet(NAME, num_classes=10).state_dict())
    with pytest.raises(WeightsError, match="(?s)base.14.3.weight.*another number of classes"):
        W.load_model(NAME, str(path))


def test_not_a_state_dict(tmp_path):
    with pytest.raises(WeightsError, match="does not contain a state_dict"):
        W.load_state_dict(NAME, str(save(tmp_path, [torch.zeros(2)])))
    with pytest.raises(WeightsError, match="does not contain a state_dict"):
        W.load_state_dict(NAME, str(save(tmp_path, {"a": 1})))


def test_pickled_objects_refused(tmp_path):
    import argparse

    path = save(tmp_path, {"args": argparse.Namespace(lr=0.1), "x": torch.zeros(1)})
    with pytest.raises(WeightsError, match="other than tensors"):
        W.load_state_dict(NAME, str(path))
    assert path.exists()  # the user's own file is never deleted


def test_corrupt_local_file_kept(tmp_path, ckpt_bytes):
    path = tmp_path / "half.pth"
    path.write_bytes(ckpt_bytes[: len(ckpt_bytes) // 2])
    with pytest.raises(WeightsError, match=f"{path}.*corrupt or truncated"):
        W.load_model(NAME, str(path))
    assert path.exists()


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="meaningless"):
        model = W.load_model(NAME, "random")
    assert not model.training
    assert any("RANDOM" in r.getMessage() and "meaningless" in r.getMessage() for r in caplog.records)
    with pytest.raises(WeightsError, match="random"):
        W.load_state_dict(NAME, "random")


def test_load_model_unknown_name():
    with pytest.raises(ValueError, match="unknown HarDNet model"):
        W.load_model("hardnet1000", "random")


# ---------------------------------------------------------------------------- downloads


def test_official_download_cached_once(official, http_server, state_dict_39ds):
    model = W.load_model(NAME)  # weights=None -> registry URL
    assert same_tensors(model.state_dict(), state_dict_39ds)
    cached = W.cache_dir() / "hardnet39ds-0e6c6fa9.pth"
    assert W.cache_path(official) == cached and cached.is_file()
    assert Path(torch.hub.get_dir()) / "checkpoints" == W.cache_dir()
    assert [p.name for p in W.cache_dir().iterdir() if p.name.endswith(".part")] == []
    assert http_server.hits["/hardnet/hardnet39ds-0e6c6fa9.pth"] == 1
    # Reused without any network: the server is gone.
    http_server.close()
    assert same_tensors(W.load_state_dict(NAME, official), state_dict_39ds)
    assert same_tensors(W.load_model(NAME, "official").state_dict(), state_dict_39ds)


def test_plain_http_url(http_server, ckpt_bytes, state_dict_39ds):
    url = http_server.add("/some/dir/mine.pth", ckpt_bytes)
    assert same_tensors(W.load_state_dict(NAME, url, progress=True), state_dict_39ds)
    assert W.cache_path(url).is_file() and W.cache_path(url).name.endswith("-mine.pth")
    W.load_state_dict(NAME, url)
    assert http_server.hits["/some/dir/mine.pth"] == 1
    # another URL with the same file name is another checkpoint: never served from this cache file
    other = http_server.add("/other/dir/mine.pth", ckpt_bytes)
    assert W.cache_path(other) != W.cache_path(url)
    W.load_state_dict(NAME, other)
    assert http_server.hits["/other/dir/mine.pth"] == 1


def test_mirror_used_when_official_fails(monkeypatch, http_server, ckpt_bytes, state_dict_39ds):
    official = http_server.add("/official/hardnet39ds-0e6c6fa9.pth", status=404)
    mirror = http_server.add("/mirror/hardnet39ds.pth", ckpt_bytes)
    monkeypatch.setitem(WEIGHTS, NAME, dataclasses.replace(WEIGHTS[NAME], url=official, mirror=mirror))
    assert same_tensors(W.load_model(NAME).state_dict(), state_dict_39ds)
    assert http_server.hits == {"/official/hardnet39ds-0e6c6fa9.pth": 1, "/mirror/hardnet39ds.pth": 1}
    assert (W.cache_dir() / "hardnet39ds.pth").is_file()
    W.load_model(NAME)  # the mirror's cached copy is found without trying the network again
    assert sum(http_server.hits.values()) == 2


def test_offline_error_message(monkeypatch, dead_url):
    mirror = dead_url.replace("hardnet39ds-0e6c6fa9.pth", "mirror/hardnet39ds.pth")
    monkeypatch.setitem(WEIGHTS, NAME, dataclasses.replace(WEIGHTS[NAME], url=dead_url, mirror=mirror))
    with pytest.raises(WeightsError) as info:
        W.load_model(NAME, None)
    msg = str(info.value)
    assert dead_url in msg and mirror in msg
    assert "HARDNET_WEIGHTS=/path/to/file.pth" in msg and "--weights" in msg
    assert str(W.cache_dir()) in msg and str(W.cache_path(dead_url)) in msg
    assert isinstance(info.value, ConfigError)
    assert not W.cache_path(dead_url).exists()


def test_http_error_and_timeout(http_server, monkeypatch, ckpt_bytes):
    url = http_server.add("/gone.pth", status=403)
    with pytest.raises(WeightsError, match="(?s)HTTP 403.*HARDNET_WEIGHTS"):
        W.load_state_dict(NAME, url)
    slow = http_server.add("/slow.pth", ckpt_bytes, delay=2.0)
    start = time.monotonic()
    with pytest.raises(WeightsError, match="timed out after 0.3 s"):
        W.load_state_dict(NAME, slow, timeout=0.3)
    assert time.monotonic() - start < 1.8
    assert not W.cache_path(slow).exists()


def test_truncated_transfer_never_cached(http_server, ckpt_bytes, state_dict_39ds):
    url = http_server.add("/trunc/hardnet39ds-x.pth", ckpt_bytes, truncate_to=len(ckpt_bytes) // 3)
    with pytest.raises(WeightsError, match="could not download"):
        W.load_state_dict(NAME, url)
    assert not W.cache_path(url).exists()
    assert [p.name for p in W.cache_dir().iterdir() if not p.name.endswith(".lock")] == []
    http_server.add("/trunc/hardnet39ds-x.pth", ckpt_bytes)  # the server recovers
    assert same_tensors(W.load_state_dict(NAME, url), state_dict_39ds)


def test_corrupt_download_deleted_then_redownloaded(http_server, ckpt_bytes, state_dict_39ds):
    # The server sends a complete-looking but corrupt file (truncated at the source).
    url = http_server.add("/bad/hardnet39ds-y.pth", ckpt_bytes[: len(ckpt_bytes) // 2])
    cached = W.cache_path(url)
    with pytest.raises(WeightsError) as info:
        W.load_model(NAME, url)
    msg = str(info.value)
    assert str(cached) in msg and "corrupt or truncated" in msg and "deleted" in msg
    assert not cached.exists()
    http_server.add("/bad/hardnet39ds-y.pth", ckpt_bytes)
    assert same_tensors(W.load_model(NAME, url).state_dict(), state_dict_39ds)
    assert http_server.hits["/bad/hardnet39ds-y.pth"] == 2


def test_corrupt_cache_entry_from_elsewhere(official, http_server, state_dict_39ds):
    cached = W.cache_path(official)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        W.load_model(NAME)
    assert not cached.exists() and http_server.hits[
        "/hardnet/hardnet39ds-0e6c6fa9.pth"] == 0
    assert same_tensors(W.load_model(NAME).state_dict(), state_dict_39ds)
    assert http_server.hits["/hardnet/hardnet39ds-0e6c6fa9.pth"] == 1


def test_sha256_checked(monkeypatch, official, http_server, ckpt_bytes, state_dict_39ds):
    entry = WEIGHTS[NAME]
    monkeypatch.setitem(WEIGHTS, NAME, dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(WeightsError, match="sha256 mismatch.*expected 0000") as info:
        W.load_model(NAME)
    assert official in str(info.value)
    assert not W.cache_path(official).exists()
    assert [p for p in W.cache_dir().iterdir() if p.name.endswith(".part")] == []

    good = hashlib.sha256(ckpt_bytes).hexdigest()
    monkeypatch.setitem(WEIGHTS, NAME, dataclasses.replace(entry, sha256=good.upper()))
    assert same_tensors(W.load_model(NAME).state_dict(), state_dict_39ds)
    # A cached file that no longer matches is thrown away and fetched again.
    n = len(ckpt_bytes) // 2
    W.cache_path(official).write_bytes(ckpt_bytes[:n] + bytes([ckpt_bytes[n] ^ 0xFF]) + ckpt_bytes[n + 1:])
    assert same_tensors(W.load_model(NAME).state_dict(), state_dict_39ds)
    assert http_server.hits["/hardnet/hardnet39ds-0e6c6fa9.pth"] == 3


_CHILD = """
import sys, hashlib
print("ready", flush=True)
sys.stdin.readline()
from worker.model import load_state_dict
sd = load_state_dict("hardnet39ds", sys.argv[1])
h = hashlib.sha256()
for k, v in sd.items():
    h.update(k.encode()); h.update(v.numpy().tobytes())
print("ok", len(sd), h.hexdigest(), flush=True)
"""


@pytest.mark.timeout(180)
def test_concurrent_processes_download_once(http_server, ckpt_bytes, state_dict_39ds, tmp_path):
    url = http_server.add("/race/hardnet39ds-race.pth", ckpt_bytes, delay=1.5)
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "shared-home"),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path) for _ in range(2)]
    try:
        for p in procs:  # both are imported and waiting: release them together
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    expected = hashlib.sha256()
    for k, v in state_dict_39ds.items():
        expected.update(k.encode())
        expected.update(v.numpy().tobytes())
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.split() == ["ok", str(len(state_dict_39ds)), expected.hexdigest()], err
    assert http_server.hits["/race/hardnet39ds-race.pth"] == 1
    checkpoints = tmp_path / "shared-home" / "hub" / "checkpoints"
    assert [p.read_bytes() for p in checkpoints.glob("*-hardnet39ds-race.pth")] == [ckpt_bytes]
    assert [p.name for p in checkpoints.iterdir() if p.name.endswith(".part")] == []


def test_load_weights_into_existing_model(ckpt_39ds, state_dict_39ds):
    model = build_hardnet(NAME)
    assert W.load_weights(model, NAME, str(ckpt_39ds)) is model
    assert same_tensors(model.state_dict(), state_dict_39ds)
    assert model.training  # load_weights leaves the mode alone; load_model returns eval
    with pytest.raises(WeightsError, match="does not fit"):
        W.load_weights(build_hardnet(NAME, num_classes=5), NAME, ckpt_39ds.as_uri())


# ---------------------------------------------------------------- `hardnet weights` (the CLI)
def hardnet(*args: str, torch_home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_HOME=str(torch_home), HARDNET_TUNE_MALLOC="0")
    return subprocess.run([sys.executable, "-m", "producer.cli", "weights", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_weights_download_seeds_the_cache_from_a_mirror(http_server, ckpt_bytes, state_dict_39ds, tmp_path):
    """An offline fleet's cache, pre-seeded from an internal mirror: the file lands under the
    official name, so a worker asking for the official weights loads it with no network."""
    official_name = W.cache_path(WEIGHTS[NAME].url).name
    http_server.add(f"/mirror/{official_name}", ckpt_bytes)
    home = tmp_path / "home"
    p = hardnet("download", NAME, "--mirror", http_server.base_url + "/mirror/", "-q", torch_home=home)
    assert p.returncode == 0, p.stderr
    sha = hashlib.sha256(ckpt_bytes).hexdigest()
    cached = home / "hub" / "checkpoints" / official_name
    assert p.stdout.split() == [NAME, str(cached), f"sha256:{sha}"]
    assert cached.read_bytes() == ckpt_bytes
    listed = hardnet("list", torch_home=home)
    assert f"cached {cached}" in next(x for x in listed.stdout.splitlines() if x.startswith(NAME + " "))
    # the official weights now load from the cache alone (the official URL is unreachable here)
    os.environ["TORCH_HOME"] = str(home)  # the autouse fixture restores it
    assert same_tensors(W.load_state_dict(NAME, WEIGHTS[NAME].url), state_dict_39ds)
    assert W.source_sha256(NAME, None) == sha


def test_weights_download_refuses_a_file_that_does_not_load(http_server, tmp_path):
    official_name = W.cache_path(WEIGHTS[NAME].url).name
    http_server.add(f"/mirror/{official_name}", b"not a checkpoint at all")
    home = tmp_path / "home"
    p = hardnet("download", NAME, "--mirror", http_server.base_url + "/mirror/", "-q", torch_home=home)
    assert p.returncode == 1
    assert "corrupt or truncated" in p.stderr
    assert not (home / "hub" / "checkpoints" / official_name).exists()


def test_weights_download_usage_errors(tmp_path):
    assert hardnet("download", torch_home=tmp_path).returncode == 2
    p = hardnet("download", "hardnet999", torch_home=tmp_path)
    assert p.returncode == 2 and "unknown model(s) hardnet999" in p.stderr


def test_random_weights_have_a_stable_digest():
    a = W.state_dict_sha256(W.load_model(NAME, "random"))
    b = W.state_dict_sha256(W.load_model(NAME, "random"))
    assert a == b and len(a) == 64
    assert W.source_sha256(NAME, "random") is None
