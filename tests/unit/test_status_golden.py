"""`hardnet status JOB` and `hardnet status` as people read them (issue 21, item 3): the text of a job
in each state, compared with golden files under tests/fixtures/status/. The jobs are made in a real
redis-server through JobStore (create, seal, start, complete, dead-letter, finish, cancel, abandon),
their times then set to fixed instants; the command runs in-process with the clock frozen, so the
text is stable. `HNQ_UPDATE_GOLDEN=1` rewrites the files (then read the diff)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cluster import ROOT

GOLDEN = ROOT / "tests" / "fixtures" / "status"
T0 = 1767268800.0          # 2026-01-01 12:00:00 UTC: submitted
NOW = T0 + 95.0            # the frozen clock of the queued and running jobs


def _times(store, job: str, started: float | None, finished: float | None) -> None:
    k = store.key(job)
    store.r.hset(k, "submitted_at", T0)
    store.r.zadd("hnq:jobs", {job: T0 + len(job) % 7})     # a fixed order in the recent list
    if started is not None:
        store.r.hset(k, "started_at", T0 + started)
    if finished is not None:
        store.r.hset(k, "finished_at", T0 + finished)


def _make(store, state: str) -> str:
    """A job of 1,000 images in 2 chunks of 500 in ``state``, through JobStore as the system does."""
    job = f"20260101-120000-{state.replace('_', '')[:8]:0>8}"
    opts = json.dumps({"format": "parquet", "top_k": 10}) if state == "done" else None
    dest = None if state == "cancelled" else "file:///data/labels/"
    store.create(job, model="hardnet68", dest=dest, queue="hardnet", sources=["/data/photos/"],
                 chunk_size=500, submitted_at=T0, options=opts)
    if state == "abandoned":
        store.heartbeat(job, 0.001)
        store.start_chunk(job, 0)
        store.complete_chunk(job, 0, 500, 0, weights="official")
        deadline = time.monotonic() + 10
        while store.r.exists(store.key(job, "hb")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.abandon_if_gone(job)
        _times(store, job, 2.0, None)
        store.r.hset(store.key(job), "finished_at", T0 + 40)
        return job
    store.seal(job, 1000, 2)
    if state == "queued":
        _times(store, job, None, None)
        return job
    store.start_chunk(job, 0)
    if state == "running":
        store.complete_chunk(job, 0, 498, 2, codes={"decode_error": 2}, weights="official")
        store.start_chunk(job, 1)
        _times(store, job, 3.0, None)
        return job
    if state == "cancelled":
        store.complete_chunk(job, 0, 500, 0, weights="random")
        assert store.cancel(job) == "cancelled"
        _times(store, job, 3.0, 9.0)
        return job
    store.start_chunk(job, 1)
    if state == "done":
        store.complete_chunk(job, 0, 500, 0, weights="official")
        store.complete_chunk(job, 1, 500, 0, weights="official")
        store.finish(job, "done")
    elif state == "done_with_errors":
        store.complete_chunk(job, 0, 497, 3, codes={"decode_error": 2, "not_found": 1}, weights="official")
        store.complete_chunk(job, 1, 500, 0, weights="official")
        store.finish(job, "done_with_errors")
    elif state == "failed":
        store.complete_chunk(job, 0, 500, 0, weights="official")
        store.complete_dead(job, 1, 500, "ConnectionError: storage down", 5)
        store.finish(job, "failed", "1 chunk dead-lettered (hardnet redrive)")
    _times(store, job, 3.0, 3.0 + 1000 / 260.37830958810565)
    return job


STATES = ["queued", "running", "done", "done_with_errors", "failed", "cancelled", "abandoned"]


@pytest.fixture
def frozen(redis_url, monkeypatch, tmp_path):
    monkeypatch.setenv("HARDNET_BROKER_URL", redis_url)
    monkeypatch.setenv("HARDNET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HARDNET_VISIBILITY_TIMEOUT", "3600")
    from hnq.jobs.store import JobStore

    return JobStore(redis_url)


def _status(args, monkeypatch, capsys) -> tuple[int, str, str]:
    from producer.cli import main

    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: NOW)
        rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _check(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("HNQ_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden {path} (HNQ_UPDATE_GOLDEN=1 writes it)"
    assert text == path.read_text(), f"hardnet status differs from {path}:\n{text}"


@pytest.mark.parametrize("state", STATES)
def test_status_of_a_job_in_each_state(frozen, monkeypatch, capsys, state):
    job = _make(frozen, state)
    assert frozen.info(job).state == state
    rc, out, err = _status(["status", job], monkeypatch, capsys)
    assert rc == (6 if state == "abandoned" else 0), err
    _check(state, out)
    # --json keeps its fields (added ones only) and their values
    rc, out, _ = _status(["status", job, "--json"], monkeypatch, capsys)
    d = json.loads(out)
    assert d["state"] == state and {"dead_letters", "stalled_chunks", "weights", "dropped"} <= set(d)
    assert set(frozen.info(job).model_dump()) <= set(d)


def test_the_recent_jobs_table(frozen, monkeypatch, capsys):
    for state in STATES:
        _make(frozen, state)
    rc, out, err = _status(["status"], monkeypatch, capsys)
    assert rc == 0, err
    _check("recent", out)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["SUBMITTED", "(UTC)", "JOB", "STATE"] and len(lines) == 1 + len(STATES)
    # aligned: every column starts at the same offset in every row
    starts = [lines[0].index(h) for h in ("JOB", "STATE", "DONE", "FAILED", "MODEL", "WEIGHTS", "DEST")]
    for line in lines[1:]:
        for s in starts:
            assert line[s - 2:s] == "  " and line[s] != " ", (line, s)


def test_an_empty_redis_says_so(frozen, monkeypatch, capsys):
    rc, out, err = _status(["status"], monkeypatch, capsys)
    assert rc == 0 and out == "" and err == "hardnet: no jobs in this Redis yet (hardnet submit starts one)\n"
