"""Fair share between jobs (hnq.jobs.dispatch) against a real redis-server, with real Celery
messages: the order chunks reach the Celery queue, priorities, a cancelled job, two dispatchers at
once, the sweeper's rule for chunks still on a ready list, and a job that lost its turn."""
from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from hnq.jobs.dispatch import Dispatcher, active_key, ready_lists
from hnq.jobs.store import JobStore
from hnq.jobs.sweep import lost_chunks, sweep

Q = "hardnet"


@pytest.fixture
def store(redis_url):
    return JobStore(redis_url)


@pytest.fixture
def app(redis_url):
    from producer.settings import ProducerSettings
    from producer.submit import sender

    return sender(ProducerSettings(broker_url=redis_url))


def _job(store, job: str, chunks: int, priority: str = "normal", sealed: bool = True) -> None:
    store.create(job, model="hardnet39ds", dest=None, queue=Q, priority=priority)
    ready_lists(store).push(job, Q, priority, [(c, 8, f"{c:08x}") for c in range(chunks)])
    if sealed:
        store.seal(job, chunks * 8, chunks)


def _queued(store) -> list[tuple[str, int]]:
    """(job, chunk) of the messages in the Celery queue, oldest first (kombu envelopes)."""
    out = []
    for raw in reversed(store.r.lrange(Q, 0, -1)):
        env = json.loads(raw)
        args = json.loads(base64.b64decode(env["body"]))[0]
        out.append((args[0]["job_id"], args[0]["chunk"]))
    return out


def test_jobs_of_one_priority_are_served_in_turn(store, app):
    _job(store, "big", 10)
    time.sleep(0.01)
    _job(store, "small", 2)
    assert Dispatcher(store, app, ahead=6).top_up(Q) == 6
    assert _queued(store) == [("big", 0), ("small", 0), ("big", 1), ("small", 1), ("big", 2), ("big", 3)]
    # the message is the chunk's claim check, built from the job's fields
    env = json.loads(store.r.lindex(Q, -1))
    task = json.loads(base64.b64decode(env["body"]))[0][0]
    assert task == {"v": 2, "job_id": "big", "chunk": 0, "count": 8, "digest": "00000000", "model": "hardnet39ds"}
    assert store.seen("big")[0][0] == "q" and store.seen("big")[4][0] == "p"
    # small has nothing left: it left the turn; big keeps its place
    assert store.r.zrange(active_key(Q), 0, -1) == ["big"]


def test_higher_priority_first_lower_last(store, app):
    _job(store, "low", 3, "low")
    _job(store, "normal", 3)
    _job(store, "high", 2, "high")
    d = Dispatcher(store, app, ahead=8)
    assert d.top_up(Q) == 8
    assert [j for j, _ in _queued(store)] == ["high", "high", "normal", "normal", "normal", "low", "low", "low"]
    assert d.top_up(Q) == 0            # the queue holds `ahead` already


def test_cancelled_job_is_skipped_and_its_ready_chunks_dropped(store, app):
    _job(store, "gone", 5)
    _job(store, "live", 2)
    store.cancel("gone")
    assert Dispatcher(store, app, ahead=4).top_up(Q) == 2
    assert _queued(store) == [("live", 0), ("live", 1)]
    assert store.r.llen(store.key("gone", "ready")) == 0 and store.r.zcard(active_key(Q)) == 0


def test_two_dispatchers_send_every_chunk_once(store, app):
    for j in range(3):
        _job(store, f"j{j}", 30)
    d1, d2 = Dispatcher(store, app, ahead=100), Dispatcher(store, app, ahead=100)
    ts = [threading.Thread(target=d.top_up, args=(Q,)) for d in (d1, d2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    got = _queued(store)
    assert sorted(got) == sorted((f"j{j}", c) for j in range(3) for c in range(30))
    assert len(got) == 90


def test_sweeper_leaves_waiting_chunks_and_resends_lost_ones(store, app):
    _job(store, "j", 4)
    now = time.time() + 1000                    # long after: only the waiting rule keeps a chunk
    assert lost_chunks(store, "j", 60, now=now) == []
    Dispatcher(store, app, ahead=1).top_up(Q)   # chunk 0 dispatched (in the queue); 1..3 wait
    assert lost_chunks(store, "j", 60, now=now) == []
    # the ready list is lost (a failover's lost write, an operator's DEL): chunks 1..3 are lost
    store.r.delete(store.key("j", "ready"))
    assert lost_chunks(store, "j", 60, now=now) == [1, 2, 3]


def test_sweep_puts_back_a_job_that_lost_its_turn(store, app):
    _job(store, "j", 3)
    store.r.zrem(active_key(Q), "j")           # a dispatcher died between ZPOPMIN and giving it back
    assert Dispatcher(store, app).top_up(Q) == 0
    sweep(store, visibility_timeout=3600, jobs=["j"])
    assert store.r.zrange(active_key(Q), 0, -1) == ["j"]
    assert Dispatcher(store, app, ahead=3).top_up(Q) == 3


def test_a_publish_that_fails_puts_the_chunk_back(store):
    class Broken:
        def send_task(self, *a, **kw):
            raise ConnectionError("broker away")

    _job(store, "j", 2)
    with pytest.raises(ConnectionError):
        Dispatcher(store, Broken()).top_up(Q)
    assert store.r.lrange(store.key("j", "ready"), 0, -1) == ["1 8 00000001", "0 8 00000000"]
    assert store.r.zrange(active_key(Q), 0, -1) == ["j"]


def test_exporter_counts_the_backlog_across_jobs(store, app):
    from producer.exporter import QueueCollector

    _job(store, "a", 5)
    _job(store, "b", 3)
    Dispatcher(store, app, ahead=2).top_up(Q)
    got = {(m.name, tuple(s.labels.items())): s.value for m in QueueCollector(store, [Q]).collect()
           for s in m.samples}
    assert got[("hardnet_queue_messages", (("queue", Q),))] == 2
    assert got[("hardnet_queue_backlog_chunks", (("queue", Q),))] == 8
    assert got[("hardnet_queue_ready_jobs", (("queue", Q),))] == 2


def test_a_turn_stays_when_its_dispatcher_dies_and_a_lost_dispatch_is_resent(store, app):
    """The turn is a rotation of the sorted set (the job never leaves it while it has chunks); a
    chunk popped by a dispatcher that died before publishing is lost only until LOST_DISPATCH_S."""
    from hnq.jobs.sweep import LOST_DISPATCH_S

    _job(store, "j", 3)
    rl = ready_lists(store)
    assert rl.turn(Q) == "j" and store.r.zrange(active_key(Q), 0, -1) == ["j"]
    e, left = rl.take("j")                       # popped; the dispatcher dies here
    assert e == "0 8 00000000" and left == 2
    now = time.time()
    assert lost_chunks(store, "j", 3600, now=now + 5) == []
    assert lost_chunks(store, "j", 3600, now=now + LOST_DISPATCH_S + 1) == [0]
    assert Dispatcher(store, app, ahead=4).top_up(Q) == 2          # the others were never lost
    assert _queued(store) == [("j", 1), ("j", 2)]
    assert store.r.zcard(active_key(Q)) == 0


def test_a_chunk_taken_by_a_dispatcher_that_died_is_pushed_back(store, app):
    """Between the pop and the publish a chunk is in hnq:sending:QUEUE; a dispatcher that finds one
    there for RECOVER_S puts it back at the head of its job's ready list."""
    from hnq.jobs.dispatch import sending_key

    _job(store, "j", 2)
    rl = ready_lists(store)
    rl.turn(Q)
    e, _ = rl.take("j")                                 # taken ...
    store.r.zadd(sending_key(Q), {f"j {e}": time.time() - 60})   # ... noted, then the process died
    d = Dispatcher(store, app, ahead=1)
    assert d.recover(Q) == 1 and store.r.zcard(sending_key(Q)) == 0
    assert d.top_up(Q) == 1 and _queued(store) == [("j", 0)]
    # a chunk being sent right now (younger than RECOVER_S) is left alone
    store.r.zadd(sending_key(Q), {"j 1 8 00000001": time.time()})
    assert d.recover(Q) == 0


def test_turns_in_the_same_millisecond_still_alternate(store, app, monkeypatch):
    """Every turn at one frozen clock (a fast dispatcher: many turns per ms): the jobs still take
    turns, not the lowest job id twice (equal scores are ordered by member)."""
    import hnq.jobs.dispatch as dispatch

    _job(store, "aaa", 4)
    _job(store, "zzz", 4)
    monkeypatch.setattr(dispatch.time, "time", lambda: 1_800_000_000.0)
    assert Dispatcher(store, app, ahead=6).top_up(Q) == 6
    jobs = [j for j, _ in _queued(store)]
    assert all(a != b for a, b in zip(jobs, jobs[1:])), jobs
