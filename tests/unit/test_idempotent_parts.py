"""Issue 19, items 1-2 against a real redis-server, moto's S3 server and local files: parts that
cannot regress (conditional writes on every destination), the dead-letter race closed at each of
its windows (provoked deterministically with a hook in the code path), per-chunk leases and the
one re-send rule (hnq.jobs.sweep.lost_chunks), records kept across attempts."""
from __future__ import annotations

import json
import time

import pytest

from hnq.errors import ErrorCode
from hnq.jobs import parts
from hnq.jobs.inputs import store_chunk_uris
from hnq.jobs.store import JobStore
from hnq.jobs.sweep import lost_chunks
from hnq.schema import ChunkTask, Label, ResultRecord
from hnq.storage import open_destination

URIS = [f"s3://src/img-{i}.jpg" for i in range(4)]


def _ok(uri: str, label: str = "cat") -> ResultRecord:
    return ResultRecord(uri=uri, status="ok", model="hardnet39ds", job_id="J", weights="random",
                        top5=[Label(index=1, label=label, score=0.9)])


def _good() -> list[ResultRecord]:
    return [_ok(u) for u in URIS]


def _worse() -> list[ResultRecord]:
    """What a late attempt during a storage outage makes: throttled records."""
    return [_ok(URIS[0], "dog")] + [ResultRecord.failure(u, ErrorCode.throttled, "gave up", "hardnet39ds",
                                                         job_id="J") for u in URIS[1:]]


@pytest.fixture
def store(redis_url):
    return JobStore(redis_url)


@pytest.fixture(params=["file", "s3", "redis"])
def dest(request, tmp_path, redis_url):
    """A destination of each kind (None = the job's parts in Redis)."""
    if request.param == "file":
        return f"file://{tmp_path}/out/"
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        s3.create_bucket(Bucket="dst")
        return "s3://dst/r/"
    return None


def _stored(store: JobStore, dest: str | None, chunk: int = 0) -> bytes | None:
    if dest is None:
        got = store.get_part_versioned("J", chunk)
        return got[0] if got else None
    return open_destination(dest).get(f"J/part-{chunk:05d}.jsonl")


def test_a_complete_part_is_never_overwritten_by_a_worse_attempt(store, dest):
    store.create("J", model="hardnet39ds", dest=dest)
    held = parts.write_part(store, dest, "J", 0, _good())
    first = _stored(store, dest)
    assert [r.status for r in held] == ["ok"] * 4
    # a late duplicate with throttled records: the complete part stands and is what it returns
    worse = _worse()
    held2 = parts.write_part(store, dest, "J", 0, worse)
    assert held2 is not worse and [r.model_dump() for r in held2] == [r.model_dump() for r in held]
    assert _stored(store, dest) == first


def test_a_failure_part_is_replaced_by_a_good_one_but_never_the_reverse(store, dest):
    store.create("J", model="hardnet39ds", dest=dest)
    failed = [ResultRecord.failure(u, ErrorCode.chunk_failed, "dead", "hardnet39ds", job_id="J") for u in URIS]
    assert parts.write_part(store, dest, "J", 0, failed) is failed
    good = _good()
    assert parts.write_part(store, dest, "J", 0, good) is good           # replaces (If-Match)
    again = _stored(store, dest)
    assert b"chunk_failed" not in again and again.count(b'"ok"') == 4
    assert parts.write_part(store, dest, "J", 0, failed) is not failed   # never the reverse
    assert _stored(store, dest) == again


def test_s3_conditional_put_refuses_a_stale_version(s3):
    s3.create_bucket(Bucket="dst")
    d = open_destination("s3://dst/r/")
    assert d.put_if("k", b"one")
    assert not d.put_if("k", b"two")                   # If-None-Match: * on an existing key
    data, etag = d.get_versioned("k")
    assert data == b"one"
    assert d.put_if("k", b"three", expect=etag)        # If-Match with the current ETag
    assert not d.put_if("k", b"four", expect=etag)     # ... and with the old one: 412
    assert d.get("k") == b"three"


def test_file_conditional_put_refuses_a_stale_version(tmp_path):
    d = open_destination(f"file://{tmp_path}/")
    assert d.put_if("J/k", b"one") and not d.put_if("J/k", b"two")
    data, version = d.get_versioned("J/k")
    assert d.put_if("J/k", b"three", expect=version)
    assert not d.put_if("J/k", b"four", expect=version)
    assert d.get("J/k") == b"three" and d.list("J/") == ["J/k"]     # no temporary file left


# ------------------------------------------------------------------ the dead-letter race, closed
def _task(dest: str | None, n: int = 4) -> ChunkTask:
    return ChunkTask(job_id="J", chunk=0, count=n, digest="0" * 24, model="hardnet39ds", dest=dest)


def _job(store: JobStore, dest: str | None) -> None:
    store.create("J", model="hardnet39ds", dest=dest)
    d = open_destination(dest) if dest else None
    store_chunk_uris(store, d, "J", 0, URIS)
    store.seal("J", total=4, chunks=1)


def _good_attempt(store: JobStore, dest: str | None) -> None:
    """The late first attempt finishing: its part, then its count."""
    held = parts.write_part(store, dest, "J", 0, _good())
    store.complete_chunk("J", 0, sum(r.status == "ok" for r in held), 0)


def _assert_good(store: JobStore, dest: str | None) -> None:
    data = _stored(store, dest)
    assert data is not None and b"chunk_failed" not in data and data.count(b'"ok"') == 4, data
    info = store.info("J")
    assert (info.succeeded, info.failed, info.dead_chunks) == (4, 0, 0), info
    assert store.dead_letters("J") == []


@pytest.mark.parametrize("window", ["before_failure_write", "before_dead_record", "after_dead_letter"])
def test_a_late_good_attempt_always_wins_over_the_dead_letter(store, dest, monkeypatch, window):
    """The good attempt completes at each point of the dead-letter's path (an injected hook runs
    it exactly there): whatever the order, the good part stands and is what is counted."""
    _job(store, dest)
    if window == "before_failure_write":
        real = parts.kept_records

        def hook(*a, **kw):                 # after the is_completed check, before the failure part
            _good_attempt(store, dest)
            return real(*a, **kw)
        monkeypatch.setattr(parts, "kept_records", hook)
    elif window == "before_dead_record":
        real_dead = store.complete_dead

        def hook(*a, **kw):                 # the failure part written, the dead letter not recorded yet
            _good_attempt(store, dest)
            return real_dead(*a, **kw)
        monkeypatch.setattr(store, "complete_dead", hook)
    result = parts.dead_letter(store, _task(dest), None, "TransientError: storage down", 5)
    if window == "after_dead_letter":
        assert result == "dead" and store.info("J").dead_chunks == 1
        assert b"chunk_failed" in _stored(store, dest)
        _good_attempt(store, dest)           # the late attempt finishes after the dead letter
    else:
        assert result == "kept"
    _assert_good(store, dest)


def test_dead_letter_keeps_the_records_earlier_attempts_finished(store, tmp_path):
    dest = f"file://{tmp_path}/out/"
    _job(store, dest)
    # attempt 1 labelled two images before storage went down; they are kept, not turned chunk_failed
    assert parts.keep_records(store, "J", 0, {0: _ok(URIS[0]), 2: _ok(URIS[2]),
                                              3: ResultRecord.failure(URIS[3], ErrorCode.throttled, "x",
                                                                      "hardnet39ds")}) == 2
    assert sorted(parts.kept_records(store, "J", 0, URIS)) == [0, 2]
    assert parts.dead_letter(store, _task(dest), None, "StorageDown", 5) == "dead"
    recs = [json.loads(x) for x in _stored(store, dest).splitlines()]
    assert [r["status"] for r in recs] == ["ok", "error", "ok", "error"]
    assert recs[1]["error"]["code"] == recs[3]["error"]["code"] == "chunk_failed"
    info = store.info("J")
    assert (info.succeeded, info.failed, info.dead_chunks, info.error_codes) == (2, 2, 1, {"chunk_failed": 2})


# ------------------------------------------------------------------ claims, leases, the re-send rule
def test_claim_done_busy_and_lease_expiry(store):
    store.create("L", model="m", dest=None)
    assert store.claim_chunk("L", 0, "a", 30)[0] == "ok"
    verdict, expiry = store.claim_chunk("L", 0, "b", 30)
    assert verdict == "busy" and expiry > time.time() + 20             # another attempt runs it
    assert store.renew_chunk_lease("L", 0, "a", 30) and not store.renew_chunk_lease("L", 0, "b", 30)
    store.release_chunk_lease("L", 0, "b")                           # not b's: nothing happens
    assert store.claim_chunk("L", 0, "b", 30)[0] == "busy"
    store.release_chunk_lease("L", 0, "a")
    assert store.claim_chunk("L", 0, "b", 1)[0] == "ok"              # released: b takes it
    time.sleep(1.2)
    assert store.claim_chunk("L", 0, "c", 30)[0] == "ok"             # b's expired: c takes it
    store.complete_chunk("L", 0, 1, 0)
    assert store.claim_chunk("L", 0, "d", 30)[0] == "done"           # done: nothing to do
    store.complete_dead("L", 1, 1, "x", 5)
    assert store.claim_chunk("L", 1, "d", 30)[0] == "ok"             # dead-lettered: redrive runs it
    store.cancel("L")
    assert store.claim_chunk("L", 2, "d", 30)[0] == "cancelled"
    assert store.claim_chunk("nope", 0, "d", 30)[0] == "missing"


def test_claim_and_start_is_the_claim_then_the_start_in_one_script(store):
    """JobStore.claim_and_start: the claim's verdicts as claim_chunk gives them, and only when the
    lease is taken the start of start_chunk (state, delivery, seen "s", the queue's watermark)
    plus whether an earlier attempt kept records; complete_chunk then drops those and releases
    the lease (its token's only) with the outcome."""
    store.create("S", model="m", dest=None, queue="qs")
    store.r.hset(store.key("S", "seen"), "0", "q 1700.5")
    verdict, expiry, started = store.claim_and_start("S", 0, "a", 30)
    assert verdict == "ok" and expiry > time.time() + 20 and started == ("queued", 1, False)
    h = store.raw("S")
    assert h["state"] == "running" and float(h["started_at"]) > expiry - 31
    assert store.r.hget(store.key("S", "seen"), "0").startswith("s ")
    assert store.r.get("hnq:wm:qs") == "1700.5"                       # the dispatch time, moved
    assert store.claim_and_start("S", 0, "b", 30)[::2] == ("busy", None)    # nothing started
    assert store.r.hget(store.key("S", "attempts"), "0") == "1"
    store.keep_records("S", 0, {1: "{}"})
    store.r.hset(store.key("S", "lease"), "0", f"{time.time() - 1:.3f} a")   # a's lease expired
    assert store.claim_and_start("S", 0, "b", 30)[2] == ("running", 2, True)  # b's, records kept
    assert not store.complete_chunk("S", 0, 1, 0, drop_kept=True, lease="a")  # not a's lease now
    assert store.kept_records("S", 0) == {} and store.chunk_leases("S") != {}
    store.keep_records("S", 0, {1: "{}"})
    store.complete_chunk("S", 0, 1, 0, drop_kept=True, lease="b")     # counted once; b's released
    assert store.kept_records("S", 0) == {} and store.chunk_leases("S") == {}
    assert store.claim_and_start("S", 0, "c", 30) == ("done", 0.0, None)
    store.complete_dead("S", 1, 1, "x", 5)
    assert store.claim_and_start("S", 1, "d", 30)[0] == "ok"          # dead-lettered: redrive runs it
    store.cancel("S")
    assert store.claim_and_start("S", 2, "d", 30) == ("cancelled", 0.0, None)
    assert store.claim_and_start("nope", 0, "d", 30) == ("missing", 0.0, None)


def test_one_resend_rule_from_our_own_state(store):
    """Chunks 0-5 of a sealed job: done, in flight (live lease), queued behind the watermark, a
    retry due soon, lost (sent before the watermark), started with an expired lease."""
    store.create("R", model="m", dest=None, queue="qr", submitted_at=1000.0)
    store.seal("R", total=6, chunks=6)
    now = 2000.0
    store.mark_sent("R", [0, 1, 2, 3, 4, 5], at=1500.0)
    store.complete_chunk("R", 0, 1, 0)
    store.r.hset(store.key("R", "lease"), mapping={"1": f"{now + 20} t1", "5": f"{now - 100} t5"})
    store.r.hset(store.key("R", "seen"), mapping={"1": "s 1600", "2": "q 1900", "3": f"r {now - 5}",
                                                    "5": "s 1600"})
    store.r.set("hnq:wm:qr", 1800)               # chunks sent before 1800 have left the list
    store.r.rpush("qr", "x")                     # the list is not empty
    assert lost_chunks(store, "R", 60, now=now) == [4, 5]
    assert lost_chunks(store, "R", 200, now=now) == [4]          # 5's lease expired only 100 s ago
    store.r.delete("qr")                         # list gone: 2 (sent 100 s ago) is lost too
    assert lost_chunks(store, "R", 60, now=now) == [2, 4, 5]
    store.forget_attempts("R", [4])
    assert store.start_chunk("R", 4)[1] == 1     # a re-send's fresh budget
