"""The streaming engine inside real workers: `hardnet submit` -> real redis-server -> `hardnet
worker` processes (threads pool, several chunks in flight) -> moto's S3 server behind the fault
proxy, or local files. What issue 7 asks to see: batches span chunks; one never-served object is
one coded record while the other 63 are labelled (no dead letter); storage fully down retries the
chunk instead of recording failures; SIGKILL with several chunks in flight loses nothing and
duplicates nothing; cancel while chunks are in flight stops them."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import redis

from cluster import wait_state as _wait_state, Worker, base_env, cli, cli_json, image_bytes, read_jsonl
from faultproxy import FaultProxy
from servers import s3_env

pytestmark = pytest.mark.slow




def _images(d: Path, n: int, fmt: str = "JPEG") -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"img-{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(image_bytes(i, fmt, (160, 120)))


def _records(out: Path, job: str) -> list[dict]:
    recs = []
    for part in sorted((out / job).glob("part-*.jsonl")):
        recs += read_jsonl(part.read_text())
    return recs


@pytest.fixture
def proxy(s3, moto_server):
    with FaultProxy(moto_server.url) as p:
        yield p


def _fill(s3, n: int, bucket: str = "src") -> list[str]:
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket="dst")
    keys = [f"p/{i:03d}.jpg" for i in range(n)]
    for i, k in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=k, Body=image_bytes(i, "JPEG", (160, 120)))
    return [f"s3://{bucket}/{k}" for k in keys]


def test_batches_span_chunks(redis_url, tmp_path):
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_BATCH_SIZE="32",
                   HARDNET_CHUNKS_IN_FLIGHT="8", HARDNET_BATCH_WAIT_MS="200")
    _images(tmp_path / "in", 96)
    w = Worker(env, "batches", tmp_path)
    try:
        w.wait_ready()
        rc, st = cli_json(["submit", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                           "--chunk-size", "4", "--wait", "--json"], env, timeout=300)
        log = w.log()
    finally:
        w.stop()
    assert rc == 0 and st["succeeded"] == 96
    largest = max(int(m) for m in re.findall(r"engine: batches=\d+ mean=[\d.]+ largest=(\d+)", log))
    print(f"\nMEASURED chunk size 4, batch 32, 8 chunks in flight: largest batch {largest}")
    assert largest > 4, "no batch mixed images of several chunks"
    recs = _records(tmp_path / "out", st["job_id"])
    assert len(recs) == 96 and len({r["uri"] for r in recs}) == 96
    # records keep their chunk's order inside each part
    for part in sorted((tmp_path / "out" / st["job_id"]).glob("part-*.jsonl")):
        uris = [r["uri"] for r in read_jsonl(part.read_text())]
        assert uris == sorted(uris)


def test_one_never_served_object_is_one_coded_record(redis_url, s3, proxy, tmp_path):
    uris = _fill(s3, 64)
    bad = uris[7]
    proxy.set_fault("503", method="GET", path="/src/p/007.jpg")      # for ever
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_FETCH_ATTEMPTS="3",
                   HARDNET_FETCH_BACKOFF_MAX="0.5", HARDNET_S3_MAX_ATTEMPTS="2", **s3_env(proxy.url))
    w = Worker(env, "never", tmp_path)
    try:
        w.wait_ready()
        t0 = time.monotonic()
        rc, st = cli_json(["submit", "s3://src/p/", "--out", "s3://dst/r/", "--chunk-size", "64",
                           "--wait", "--json"], env, timeout=300)
        took = time.monotonic() - t0
    finally:
        w.stop()
    job = st["job_id"]
    print(f"\nMEASURED one never-served object of 64: job {st['state']} in {took:.1f}s, "
          f"ok={st['succeeded']} failed={st['failed']}, 503s sent {proxy.stats()['by_mode'].get('503')}")
    assert rc == 3 and st["succeeded"] == 63 and st["failed"] == 1 and st["dead_chunks"] == 0
    recs = read_jsonl(s3.get_object(Bucket="dst", Key=f"r/{job}/part-00000.jsonl")["Body"].read().decode())
    assert [r["uri"] for r in recs] == uris
    (rec,) = [r for r in recs if r["status"] == "error"]
    assert rec["uri"] == bad and rec["error"]["code"] in ("throttled", "fetch_error"), rec
    assert "gave up after 3 attempts" in rec["error"]["message"]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert r.hget(f"hnq:job:{{{job}}}:attempts", "0") == "1", "the chunk itself must not be retried"
    # 3 engine attempts x 2 requests (boto's own retry) for that object alone
    assert proxy.stats()["by_mode"]["503"] == 6


def test_storage_fully_down_retries_the_chunk(redis_url, s3, proxy, tmp_path):
    _fill(s3, 24)
    # One request per fetch attempt (no S3-client retries, whose random backoff made an image's
    # give-up take seconds: then under half the chunk's images gave up within the outage, and it
    # was recorded as throttled images instead, about 1 run in 3), so every delivery during the
    # outage sees storage down at once; enough deliveries to outlast it.
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_FETCH_ATTEMPTS="2",
                   HARDNET_FETCH_BACKOFF_MAX="0.2", HARDNET_S3_MAX_ATTEMPTS="1",
                   HARDNET_RETRY_BACKOFF_MAX="2", HARDNET_MAX_ATTEMPTS="10", **s3_env(proxy.url))
    w = Worker(env, "down", tmp_path)
    try:
        w.wait_ready()
        # every GET of an image, for 6 s from now (the listing at submit is a GET of /src too)
        proxy.set_fault("503", method="GET", path="/src/p/", duration=6)
        rc, sub = cli_json(["submit", "s3://src/p/", "--out", "s3://dst/r/", "--chunk-size", "24",
                            "--json"], env)
        job = sub["job_id"]
        st = _wait_state(env, job, timeout=180)
        log = w.log()
    finally:
        w.stop()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    attempts = int(r.hget(f"hnq:job:{{{job}}}:attempts", "0"))
    print(f"\nMEASURED storage down 6 s: chunk attempts {attempts}, job {st['state']} "
          f"ok={st['succeeded']} failed={st['failed']}")
    assert "storage looks down" in log, log[-3000:]
    # The chunk was retried and every image has its record. The delivery that straddles the end of
    # the outage can still see fewer than half its images give up, and then records those few as
    # `throttled` (docs/reliability.md: "some throttled records, each with its code, never lost
    # images"; seen 1 run in 4 on 2026-12-07, 23 ok + 1 throttled): that is the documented outcome.
    assert attempts >= 2 and st["dead_chunks"] == 0, st
    assert st["succeeded"] + st["failed"] == 24 and st["failed"] < 12, st
    assert set(st["error_codes"]) <= {"throttled"}, st


def test_sigkill_with_several_chunks_in_flight_loses_nothing(redis_url, tmp_path):
    vt = 6
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_VISIBILITY_TIMEOUT=str(vt),
                   HARDNET_CHUNKS_IN_FLIGHT="4", HARDNET_STATE_DIR=str(tmp_path / "state"))
    _images(tmp_path / "in", 160)
    out = tmp_path / "out"
    victim = Worker(env, "victim", tmp_path)
    try:
        victim.wait_ready()
        rc, sub = cli_json(["submit", str(tmp_path / "in"), "--out", str(out), "--chunk-size", "8",
                            "--json"], env)
        job = sub["job_id"]
        deadline = time.monotonic() + 120
        while True:
            log = victim.log()
            started = set(re.findall(rf"chunk {job}/(\d+) attempt 1 started", log))
            done = set(re.findall(rf"chunk {job}/(\d+) done", log))
            if len(started - done) >= 2 and done:
                break
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.05)
        victim.kill()
        in_flight = started - done
        survivor = Worker(env, "survivor", tmp_path)
        survivor.wait_ready()
        st = _wait_state(env, job, timeout=240)
        survivor.stop()
    finally:
        victim.stop()
    print(f"\nMEASURED SIGKILL with {len(in_flight)} chunks in flight: job {st['state']} ok={st['succeeded']}")
    assert len(in_flight) >= 2
    recs = _records(out, job)
    uris = [r["uri"] for r in recs]
    assert len(uris) == 160 and len(set(uris)) == 160 and st["succeeded"] == 160


def test_cancel_while_chunks_are_in_flight(redis_url, s3, proxy, tmp_path):
    _fill(s3, 80)
    proxy.set_fault("slow", method="GET", path="/src/", delay=2.0)     # a slow store, for ever:
    # no chunk can finish (20 GETs over 4 fetch threads: >= 10 s) before the ping and cancel below
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_CHUNKS_IN_FLIGHT="4",
                   HARDNET_FETCH_THREADS="4", HARDNET_FILE_ROOTS=str(tmp_path), **s3_env(proxy.url))
    w = Worker(env, "cancel", tmp_path)
    try:
        w.wait_ready()
        rc, sub = cli_json(["submit", "s3://src/p/", "--out", "s3://dst/r/", "--chunk-size", "20",
                            "--json"], env)
        job = sub["job_id"]
        for c in range(4):
            w.wait_log(f"chunk {job}/{c} attempt 1 started", timeout=60)
        # the threads pool leaves Celery's consumer free: a busy worker answers remote control
        import socket
        import subprocess
        import sys

        ping = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.app", "inspect", "ping",
                               "-d", f"cancel@{socket.gethostname()}", "--timeout", "10"],
                              env=env, cwd=str(Path(__file__).resolve().parents[2]),
                              capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0 and "pong" in ping.stdout, (ping.stdout, ping.stderr[-1000:])
        assert cli(["cancel", job], env).returncode == 0
        t0 = time.monotonic()
        for c in range(4):
            w.wait_log(f"chunk {job}/{c} dropped in flight: job cancelled", timeout=30)
        stop_s = time.monotonic() - t0
        requests_after = proxy.stats()["requests"]
        time.sleep(2)
        assert proxy.stats()["requests"] - requests_after <= 4, "cancelled images still being fetched"
        # the worker is not wedged: the next job runs
        proxy.clear()
        _images(tmp_path / "next", 6)
        rc, st = cli_json(["submit", str(tmp_path / "next"), "--wait", "--json"], env, timeout=120)
    finally:
        w.stop()
    print(f"\nMEASURED cancel with 4 chunks in flight: all dropped {stop_s:.1f}s after `hardnet cancel`")
    _, cst = cli_json(["status", job, "--json"], env)
    assert cst["state"] == "cancelled" and cst["chunks_done"] == 0
    written = [o["Key"] for o in s3.list_objects_v2(Bucket="dst", Prefix=f"r/{job}/").get("Contents", [])]
    assert written and not [k for k in written if "/part-" in k or k.endswith("manifest.json")], written
    assert rc == 0 and st["succeeded"] == 6


def test_small_chunks_are_taken_until_enough_images_are_in_flight(redis_url, s3, proxy, tmp_path):
    """worker.admission: HARDNET_CHUNKS_IN_FLIGHT=1 chunk at least, more while the held chunks have
    fewer than HARDNET_IMAGES_IN_FLIGHT=12 images: 3 chunks of 4 while the store holds every GET,
    not 1 (the old fixed count) and not 8 (the pool); all 40 labelled once the store answers."""
    _fill(s3, 40)
    proxy.set_fault("slow", method="GET", path="/src/", delay=8.0)   # no chunk finishes meanwhile
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_CHUNKS_IN_FLIGHT="1",
                   HARDNET_IMAGES_IN_FLIGHT="12", HARDNET_MAX_CHUNKS_IN_FLIGHT="8",
                   HARDNET_FETCH_THREADS="16", **s3_env(proxy.url))
    w = Worker(env, "admission", tmp_path)
    try:
        w.wait_ready()
        assert "chunks_in_flight=1..8 images_in_flight=12" in w.log()
        rc, sub = cli_json(["submit", "s3://src/p/", "--out", "s3://dst/r/", "--chunk-size", "4",
                            "--json"], env)
        job = sub["job_id"]
        # which 3 is not the point (two dispatchers, `submit`'s and the worker's, may publish
        # chunks 2 and 3 in either order: hnq.jobs.dispatch), how many is
        deadline = time.monotonic() + 60
        while len(re.findall(rf"chunk {job}/(\d+) attempt 1 started", w.log())) < 3:
            assert time.monotonic() < deadline, w.log()[-3000:]
            time.sleep(0.1)
        time.sleep(2.5)
        started = re.findall(rf"chunk {job}/(\d+) attempt 1 started", w.log())
        assert len(started) == 3 and len(set(started)) == 3, started
        proxy.clear()
        st = _wait_state(env, job, timeout=120)
    finally:
        w.stop()
    assert st["succeeded"] == 40 and st["failed"] == 0, st
