"""Finalisation as its own leased step and no zombie jobs (issue 19, items 3 and 4), against the
real parts: redis-server, moto's S3 server (behind tests/faultproxy.py where a step must be slow),
`hardnet` CLI processes and `hardnet worker` processes.

* two finalisers at once -> one manifest, one end state (the second exits while the first holds
  the lease; the first is frozen with SIGSTOP inside a slow S3 request, so the order is fixed);
* a `hardnet submit` SIGKILLed mid-listing -> `abandoned` (exit 6), then `hardnet resume` seals and
  finishes it with one record per URI of the sealed chunks;
* a chunk message from the future -> a dead letter with its reason, then `redrive` labels it."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from cluster import ROOT, Worker, base_env, cli, cli_json, image_bytes, read_jsonl, wait_state
from faultproxy import FaultProxy
from servers import s3_env

pytestmark = pytest.mark.slow


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.01)
    raise TimeoutError(what)


def test_two_finalisers_at_once_one_manifest_one_state(redis_url, s3, moto_server, tmp_path):
    from hnq.jobs.store import JobStore

    s3.create_bucket(Bucket="out")
    job = "20260101-000000-f1f1f1f1"
    store = JobStore(redis_url)
    store.create(job, model="hardnet39ds", dest="s3://out/run/")
    for c in range(3):
        body = "".join(json.dumps({"uri": f"s3://src/{c}-{i}.jpg", "status": "ok", "model": "hardnet39ds"}) + "\n"
                       for i in range(4))
        s3.put_object(Bucket="out", Key=f"run/{job}/part-{c:05d}.jsonl", Body=body.encode())
        store.start_chunk(job, c)
        store.complete_chunk(job, c, 4, 0)
    assert store.seal(job, 12, 3)          # every chunk done: complete, not finalised
    with FaultProxy(moto_server.url) as proxy:
        env = base_env(redis_url, **s3_env(proxy.url), HARDNET_STATE_DIR=str(tmp_path / "state"))
        proxy.set_fault("slow", delay=1.5)        # every S3 request of a finaliser takes 1.5 s
        a = subprocess.Popen([sys.executable, "-m", "producer.cli", "resume", job], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            r = redis.Redis.from_url(redis_url, decode_responses=True)
            lease_a = _wait(lambda: r.get(f"hnq:job:{{{job}}}:final"), 60, "finaliser A never took the lease")
            os.kill(a.pid, signal.SIGSTOP)        # A holds the lease, frozen inside a slow request
            b = cli(["resume", job], env, timeout=120)
            # B left the job to A: nothing written, no state set, A's lease untouched
            assert b.returncode == 0, b.stderr
            assert "finalised" not in b.stderr, b.stderr
            assert r.get(f"hnq:job:{{{job}}}:final") == lease_a
            assert r.hget(f"hnq:job:{{{job}}}", "state") == "running"
            assert s3.list_objects_v2(Bucket="out", Prefix=f"run/{job}/manifest")["KeyCount"] == 0
            os.kill(a.pid, signal.SIGCONT)
            out_a, err_a = a.communicate(timeout=120)
        finally:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
        assert a.returncode == 0 and "finalised" in err_a, err_a
        proxy.clear()
        manifest = s3.get_object(Bucket="out", Key=f"run/{job}/manifest.json")["Body"].read()
        assert json.loads(manifest)["state"] == "done"
        assert r.hget(f"hnq:job:{{{job}}}", "state") == "done" and r.get(f"hnq:job:{{{job}}}:final") is None
        # a late finaliser (a duplicate, the sweeper) changes nothing: same manifest, same state
        c = cli(["resume", job], env, timeout=60)
        assert c.returncode == 0 and "already done" in c.stderr, c.stderr
        assert s3.get_object(Bucket="out", Key=f"run/{job}/manifest.json")["Body"].read() == manifest
    # the state never goes back: a job marked failed is not turned done by a finaliser
    store.r.hset(store.key(job), "state", "failed")
    from hnq.jobs.finish import finalize_or_fail
    assert finalize_or_fail(store, job) is None and store.job_state(job) == "failed"


def test_submit_killed_mid_listing_is_abandoned_then_resumed(redis_url, s3, moto_server, tmp_path):
    s3.create_bucket(Bucket="src")
    n_dirs = 30
    for p in range(n_dirs):
        for i in range(2):
            s3.put_object(Bucket="src", Key=f"d{p:02d}/img-{i}.jpg", Body=image_bytes(p * 2 + i))
    out = tmp_path / "out"
    out.mkdir()
    wenv = base_env(redis_url, **s3_env(moto_server.url), HARDNET_OUTPUT_ROOTS=str(tmp_path),
                    HARDNET_SWEEP_INTERVAL="1", HARDNET_VISIBILITY_TIMEOUT="30",
                    HARDNET_STATE_DIR=str(tmp_path / "state"))
    w = Worker(wenv, "zombie", tmp_path)
    with FaultProxy(moto_server.url) as proxy:
        penv = dict(base_env(redis_url, **s3_env(proxy.url)), HARDNET_HEARTBEAT_INTERVAL="0.3",
                    HARDNET_STATE_DIR=str(tmp_path / "state"))
        try:
            w.wait_ready()
            proxy.set_fault("slow", delay=0.7, method="GET")   # each folder's listing takes 0.7 s
            sub = subprocess.Popen([sys.executable, "-m", "producer.cli", "submit", "s3://src/", "--out", str(out),
                                    "--chunk-size", "2", "--list-threads", "1", "--list-depth", "1", "--json"],
                                   env=penv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
            r = redis.Redis.from_url(redis_url, decode_responses=True)
            try:
                # killed once a few chunks were sent, long before the 30 folders are listed
                # (sent: in its seen hash until done, then in its done hash)
                job = _wait(lambda: next((j for j in r.zrevrange("hnq:jobs", 0, 0)
                                          if r.hlen(f"hnq:job:{{{j}}}:seen") + r.hlen(f"hnq:job:{{{j}}}:done") >= 3),
                                         None), 120, "no chunk sent")
                os.killpg(sub.pid, signal.SIGKILL)
                sub.wait(10)
            finally:
                if sub.poll() is None:
                    os.killpg(sub.pid, signal.SIGKILL)
            proxy.clear()
            assert r.hget(f"hnq:job:{{{job}}}", "sealed") == "0"
            st = wait_state(penv, job, ("abandoned",), timeout=120)
            assert "no heartbeat" in st["error"]
            p = cli(["status", job], penv)
            assert p.returncode == 6 and "hardnet resume" in p.stderr, p.stderr
            p = cli(["wait", job, "--timeout", "30"], penv)
            assert p.returncode == 6, p.stderr
            p = cli(["resume", job, "--wait", "--timeout", "240"], penv, timeout=300)
            log = w.log()
        finally:
            w.stop()
    assert p.returncode == 0, p.stderr[-3000:] + log[-3000:]
    assert "sealed with the" in p.stderr, p.stderr
    from hnq.jobs.inputs import decode_uris

    inputs = sorted((out / job / "inputs").glob("chunk-*.jsonl.gz"))
    manifest = json.loads((out / job / "manifest.json").read_text())
    chunks = manifest["total"] // 2
    assert 3 <= chunks < n_dirs and manifest["state"] == "done" and manifest["missing_parts"] == []
    sealed_uris = [u for f in inputs[:chunks] for u in decode_uris(f.read_bytes())[0]]
    recs = [x for f in sorted((out / job).glob("part-*.jsonl")) for x in read_jsonl(f.read_text())]
    assert sorted(x["uri"] for x in recs) == sorted(sealed_uris) and len(set(sealed_uris)) == manifest["total"]
    assert all(x["status"] == "ok" for x in recs)


def test_message_from_the_future_is_dead_lettered_with_its_reason(redis_url, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"img-{i}.jpg").write_bytes(image_bytes(i))
    out = tmp_path / "out"
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_OUTPUT_ROOTS=str(tmp_path),
                   HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_SWEEP_INTERVAL="0")
    rc, sub = cli_json(["submit", str(src), "--out", str(out), "--json"], env)   # no worker yet
    job = sub["job_id"]
    r = redis.Redis.from_url(redis_url)
    # the real message rewritten as a producer of schema version 9 would send it
    msg = json.loads(r.rpop("hardnet"))
    body = json.loads(base64.b64decode(msg["body"]))
    body[0][0] = {**body[0][0], "v": 9, "priority": "high"}
    msg["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    r.lpush("hardnet", json.dumps(msg))
    w = Worker(env, "future", tmp_path)
    try:
        w.wait_ready()
        st = wait_state(env, job, ("failed",), timeout=120)
        p = cli(["redrive", job], env)
        assert p.returncode == 0, p.stderr
        done = wait_state(env, job, ("done",), timeout=120)
        log = w.log()
    finally:
        w.stop()
    assert st["dead_chunks"] == 1 and "schema version 9" in st["dead_letters"][0]["error"], st
    assert "rejected a chunk message: schema version 9" in log
    recs = read_jsonl((out / job / "part-00000.jsonl").read_text())
    assert len(recs) == 4 and all(x["status"] == "ok" for x in recs) and done["succeeded"] == 4
