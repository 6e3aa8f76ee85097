"""The README's first command: `hardnet demo` starts its own redis-server when none answers, a
worker, submits the bundled samples through the queue and prints their top-5."""
from __future__ import annotations

import dataclasses

import pytest

from cluster import base_env, cli
from servers import free_port

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_system(tmp_path, samples_dir):
    env = base_env(f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there: the demo starts one
                   HARDNET_STATE_DIR=str(tmp_path / "state"))
    p = cli(["demo", "--model", "hardnet39ds", "--weights", "random"], env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "started redis-server" in p.stderr and "random weights" in p.stderr.lower()
    printed = [l for l in p.stdout.splitlines() if l.startswith("file://")]
    assert sorted(l.split("  [")[0].rsplit("/", 1)[-1] for l in printed) == sorted(
        f.name for f in samples_dir.iterdir() if f.suffix in (".jpg", ".png"))
    assert all("labels meaningless" in l for l in printed)


def test_demo_falls_back_to_random_weights_when_offline(monkeypatch, capsys):
    from producer.demo import _resolve_weights
    from worker.model import weights as W

    for name in ("hardnet68",):
        monkeypatch.setitem(W.WEIGHTS, name, dataclasses.replace(
            W.WEIGHTS[name], url=f"http://127.0.0.1:{free_port()}/hardnet68.pth", mirror=None))
    assert _resolve_weights("hardnet68", None) == "random"
    err = capsys.readouterr().err
    assert "could not get the official hardnet68 weights" in err and "RANDOM WEIGHTS" in err


def test_demo_never_consumes_a_shared_queue(tmp_path, redis_server):
    """With a Redis that a fleet uses, the demo works on a queue of its own: an item waiting in the
    shared `hardnet` list is still there, untouched, afterwards."""
    import redis

    redis_server.flush()
    r = redis.Redis.from_url(redis_server.url)
    r.lpush("hardnet", b"a chunk of somebody else's job")
    env = base_env(redis_server.url, HARDNET_STATE_DIR=str(tmp_path / "state"))
    p = cli(["demo", "--model", "hardnet39ds", "--weights", "random"], env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "using the Redis at" in p.stderr and "queue hardnet-demo-" in p.stderr
    assert r.lrange("hardnet", 0, -1) == [b"a chunk of somebody else's job"]
