"""Issue 19, "Show it": one delivery, one effect, through a real `hardnet worker`, a real
redis-server and moto's S3 server behind the fault proxy, which counts every request per object.

* a duplicate message of a done chunk: acknowledged with no GET (of an image or of its inputs) and
  no PUT; its part unchanged (same ETag, same bytes);
* `hardnet resume` of a running job re-sends nothing still queued or in flight, and of a done job
  nothing: every image is fetched exactly once, every chunk runs once.
(The late failing attempt against a good part is provoked deterministically in
tests/unit/test_idempotent_parts.py.)"""
from __future__ import annotations

import re

import pytest
import redis

from cluster import wait_state, Worker, base_env, cli, cli_json, image_bytes
from faultproxy import FaultProxy
from servers import s3_env

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(s3, moto_server):
    with FaultProxy(moto_server.url) as p:
        yield p


def _fill(s3, n: int) -> None:
    s3.create_bucket(Bucket="src-in")
    s3.create_bucket(Bucket="dst-out")
    for i in range(n):
        s3.put_object(Bucket="src-in", Key=f"p/{i:03d}.png", Body=image_bytes(i, "PNG"))


def _gets(proxy: FaultProxy, part: str) -> dict[str, int]:
    return {k: v for k, v in proxy.stats().get("paths", {}).items() if k.startswith("GET ") and part in k}


def test_a_duplicate_of_a_done_chunk_fetches_nothing_and_keeps_its_part(redis_url, s3, proxy, tmp_path):
    _fill(s3, 8)
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_SWEEP_INTERVAL="0",
                   **s3_env(proxy.url))
    w = Worker(env, "dup", tmp_path)
    try:
        w.wait_ready()
        rc, sub = cli_json(["submit", "s3://src-in/p/", "--out", "s3://dst-out/r/", "--chunk-size", "4",
                            "--wait", "--json"], env, timeout=240)
        assert rc == 0 and sub["state"] == "done", sub
        job = sub["job_id"]
        head = s3.head_object(Bucket="dst-out", Key=f"r/{job}/part-00000.jsonl")
        part = s3.get_object(Bucket="dst-out", Key=f"r/{job}/part-00000.jsonl")["Body"].read()
        assert len(_gets(proxy, "/src-in/")) == 8
        proxy.reset_stats()
        # the same chunk's message again (an ack lost, a restore, a false positive of the sweeper)
        from hnq.jobs.store import JobStore
        from hnq.jobs.sweep import resend_chunk

        assert resend_chunk(JobStore(redis_url), "hardnet", job, 0, "hardnet39ds", "s3://dst-out/r/")
        w.wait_log("was completed by an earlier attempt: delivery acknowledged, nothing fetched", timeout=60)
        stats = proxy.stats()
        log = w.log()
    finally:
        w.stop()
    print(f"\nMEASURED duplicate of a done chunk: {stats['requests']} requests at the proxy {stats.get('paths')}")
    assert stats["requests"] == 0, stats          # no GET of an image, of the inputs, no PUT
    assert log.count(f"chunk {job}/0 attempt") == 1, log[-3000:]     # the duplicate started no attempt
    again = s3.head_object(Bucket="dst-out", Key=f"r/{job}/part-00000.jsonl")
    assert again["ETag"] == head["ETag"] and again["LastModified"] == head["LastModified"]
    assert s3.get_object(Bucket="dst-out", Key=f"r/{job}/part-00000.jsonl")["Body"].read() == part
    _, st = cli_json(["status", job, "--json"], env)
    assert st["state"] == "done" and st["succeeded"] == 8 and st["dead_chunks"] == 0


def test_resume_of_a_running_and_of_a_done_job_does_nothing_twice(redis_url, s3, proxy, tmp_path):
    n, size = 24, 4
    _fill(s3, n)
    # one chunk at a time, and slow GETs: the job is still running, its chunks queued, at resume
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_SWEEP_INTERVAL="0",
                   HARDNET_CHUNKS_IN_FLIGHT="1", HARDNET_MAX_CHUNKS_IN_FLIGHT="1", **s3_env(proxy.url))
    proxy.set_fault("slow", delay=0.5, method="GET", path="/src-in/")
    w = Worker(env, "resume", tmp_path)
    try:
        w.wait_ready()
        rc, sub = cli_json(["submit", "s3://src-in/p/", "--out", "s3://dst-out/r/", "--chunk-size", str(size),
                            "--json"], env)
        job = sub["job_id"]
        w.wait_log(f"chunk {job}/0 attempt 1 started", timeout=120)
        _, before = cli_json(["status", job, "--json"], env)
        queued = redis.Redis.from_url(redis_url).llen("hardnet")
        p = cli(["resume", job], env)
        assert p.returncode == 0, p.stderr
        running_said = p.stderr
        st = wait_state(env, job, timeout=240)
        p2 = cli(["resume", job], env)
        log = w.log()
        gets = _gets(proxy, "/src-in/")
    finally:
        w.stop()
    print(f"\nMEASURED resume while running ({before['state']}, {queued} chunks queued): {running_said.strip()}; "
          f"after done: {p2.stderr.strip()}")
    assert before["state"] == "running" and queued >= 3, (before, queued)
    assert "0 sent again" in running_said, running_said
    assert p2.returncode == 0 and "0 sent again" in p2.stderr and "already done" in p2.stderr, p2.stderr
    assert st["succeeded"] == n
    # every image fetched exactly once, every chunk run by exactly one attempt
    assert len(gets) == n and set(gets.values()) == {1}, gets
    starts = re.findall(rf"chunk {job}/(\d+) attempt (\d+) started", log)
    assert sorted(int(c) for c, _ in starts) == list(range(n // size)) and {a for _, a in starts} == {"1"}, starts


def test_a_failed_part_write_retries_the_write_not_the_labelling(redis_url, s3, proxy, tmp_path):
    """The part's PUT fails once (500, no client retry): the chunk's records were kept, so its
    retry fetches no image again and only writes."""
    _fill(s3, 8)
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_SWEEP_INTERVAL="0",
                   HARDNET_S3_MAX_ATTEMPTS="1", HARDNET_RETRY_BACKOFF_MAX="1", **s3_env(proxy.url))
    proxy.set_fault("500", count=1, method="PUT", path="part-00000")
    w = Worker(env, "rewrite", tmp_path)
    try:
        w.wait_ready()
        rc, sub = cli_json(["submit", "s3://src-in/p/", "--out", "s3://dst-out/r/", "--chunk-size", "8",
                            "--wait", "--json"], env, timeout=240)
        log = w.log()
        gets = _gets(proxy, "/src-in/")
        stats = proxy.stats()
    finally:
        w.stop()
    assert rc == 0 and sub["state"] == "done" and sub["succeeded"] == 8, sub
    assert stats["by_mode"].get("500") == 1
    job = sub["job_id"]
    assert f"chunk {job}/0 attempt 2 started" in log, log[-3000:]
    assert "8 records kept from an earlier attempt, nothing fetched" in log, log[-3000:]
    assert len(gets) == 8 and set(gets.values()) == {1}, gets      # each image fetched once in all
