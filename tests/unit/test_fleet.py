"""hnq.fleet against a real redis-server: the workers' heartbeats, the check at submit (which
refusals, in one line, naming the settings), and the end state of a job with nothing labelled."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import redis

from hnq.errors import ConfigError
from hnq.fleet import PREFIX, Heartbeat, JobNeeds, WorkerCaps, check_job, live_workers
from hnq.jobs.finish import final_state


def _settings(**kw) -> SimpleNamespace:
    base = dict(queue="hardnet", model="hardnet68", weights=None, file_roots=[], output_roots=[],
                output_buckets=None, source_buckets=None, allow_http=False, job_weights_allow=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _publish(r, name: str, **kw) -> Heartbeat:
    return Heartbeat(r, WorkerCaps.of(_settings(**kw), hostname=f"{name}@host", pid=1000 + len(name))).start()


@pytest.fixture
def r(redis_url):
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def test_no_live_worker_lets_the_job_wait(r, tmp_path):
    note = check_job(r, "hardnet", JobNeeds.of([str(tmp_path)], dest=f"file://{tmp_path}/out/", weights=None))
    assert note and "no live worker" in note and "hardnet worker" in note
    hb = _publish(r, "other", queue="gpu")
    try:
        note = check_job(r, "hardnet", JobNeeds.of([str(tmp_path)], dest=None, weights=None))
        assert "live workers consume gpu" in note      # the worker of another queue is named, not used
    finally:
        hb.stop()


def test_refusals_of_inputs_and_outputs_in_one_line(r, tmp_path):
    src, out = tmp_path / "photos", tmp_path / "labels"
    src.mkdir()
    hb = _publish(r, "w0")
    try:
        assert [w.hostname for w in live_workers(r)] == ["w0@host"]
        with pytest.raises(ConfigError) as e:
            check_job(r, "hardnet", JobNeeds.of([str(src), "http://example.com/a.jpg"],
                                                 dest=f"file://{out}/", weights=None))
        msg = str(e.value)
        assert "\n" not in msg
        assert f"read {src}" in msg and f"write {out}/" in msg and "fetch http(s)" in msg, msg
        assert (f"HARDNET_FILE_ROOTS={src}" in msg and f"HARDNET_OUTPUT_ROOTS={out}" in msg
                and "HARDNET_ALLOW_HTTP=true" in msg), msg
        assert "refuses local files (HARDNET_FILE_ROOTS unset)" in msg      # what workers accept now
    finally:
        hb.stop()
    assert live_workers(r) == [], "a stopped worker's heartbeat is deleted"
    # S3: a source bucket and an output bucket outside the worker's lists
    hb = _publish(r, "w1", source_buckets=["src-a"], output_buckets=["out-x"], file_roots=["/elsewhere"])
    try:
        with pytest.raises(ConfigError) as e:
            check_job(r, "hardnet", JobNeeds.of(["s3://src-b/p/"], dest="s3://out-y/run/", weights=None))
        msg = str(e.value)
        assert "HARDNET_SOURCE_BUCKETS=src-a,src-b" in msg and "HARDNET_OUTPUT_BUCKETS=out-x,out-y" in msg, msg
        assert check_job(r, "hardnet", JobNeeds.of(["s3://src-a/p/"], dest="s3://out-x/run/", weights=None)) is None
    finally:
        hb.stop()


def test_one_worker_that_accepts_is_enough(r, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    beats = [_publish(r, "plain"), _publish(r, "local", file_roots=[str(src)], output_roots=[str(tmp_path)])]
    try:
        needs = JobNeeds.of([str(src / "a.jpg"), f"file://{src}/b.jpg"], dest=f"file://{tmp_path}/out/", weights=None)
        assert check_job(r, "hardnet", needs) is None
        # outside the roots (a `..` escape is made absolute first, then found outside)
        with pytest.raises(ConfigError, match="HARDNET_FILE_ROOTS"):
            check_job(r, "hardnet", JobNeeds.of([f"{src}/../../etc/x.jpg"], dest=None, weights=None))
        # job weights: only under HARDNET_JOB_WEIGHTS_ALLOW, or the worker's own
        with pytest.raises(ConfigError, match="HARDNET_JOB_WEIGHTS_ALLOW"):
            check_job(r, "hardnet", JobNeeds.of([], dest=None, weights="/models/mine.pth"))
        assert check_job(r, "hardnet", JobNeeds.of([], dest=None, weights="random")) is None
    finally:
        for b in beats:
            b.stop()
    own = _publish(r, "own", weights="/models/mine.pth", job_weights_allow=["https://models.example/"])
    try:
        assert check_job(r, "hardnet", JobNeeds.of([], dest=None, weights="/models/mine.pth")) is None
        assert check_job(r, "hardnet", JobNeeds.of([], dest=None, weights="https://models.example/a.pth")) is None
        assert "/models/mine.pth" not in r.get(own.caps.key()).split('"weights_sha256"')[1], "only a hash"
    finally:
        own.stop()


def test_heartbeat_expires_and_is_refreshed(r):
    hb = Heartbeat(r, WorkerCaps.of(_settings(), hostname="w@h", pid=1), interval_s=0.2, ttl_s=1).start()
    try:
        first = r.get(hb.caps.key())
        assert first and 0 < r.ttl(hb.caps.key()) <= 1
        for _ in range(50):            # refreshed by the thread: the value's time moves on
            if r.get(hb.caps.key()) != first:
                break
            time.sleep(0.1)
        assert r.get(hb.caps.key()) != first
    finally:
        hb._stop.set()                 # the thread stops; the key is left to expire
    for _ in range(40):
        if not r.keys(PREFIX + "*"):
            break
        time.sleep(0.1)
    assert live_workers(r) == []


def test_ready_line_says_what_is_refused():
    line = WorkerCaps.of(_settings(), hostname="w", pid=1).line()
    assert "refuses local files (HARDNET_FILE_ROOTS unset)" in line
    assert "writes no local folder (HARDNET_OUTPUT_ROOTS unset)" in line and "http(s) off" in line
    line = WorkerCaps.of(_settings(file_roots=["/data"], output_roots=["/out"], source_buckets=["b"]),
                         hostname="w", pid=1).line()
    assert "reads local files under /data" in line and "writes under /out" in line and "S3 buckets b" in line


def test_a_job_with_nothing_labelled_is_failed():
    assert final_state(0, 6, 0, succeeded=0) == "failed"
    assert final_state(0, 5, 0, succeeded=1) == "done_with_errors"
    assert final_state(0, 0, 0, succeeded=0) == "done"          # nothing to do (all skipped before)
    assert final_state(0, 0, 0, succeeded=6) == "done"
