"""Job state against a real redis-server: counters stay right under duplicate and late chunks."""
from __future__ import annotations

import pytest

from hnq.jobs.store import JobStore


@pytest.fixture
def store(redis_url):
    return JobStore(redis_url)


def test_duplicate_completion_does_not_double_count(store):
    store.create("j1", model="hardnet68", dest=None)
    assert store.start_chunk("j1", 0) == ("queued", 1)
    assert store.start_chunk("j1", 0) == ("running", 2)   # redelivered: second attempt
    assert not store.complete_chunk("j1", 0, 30, 2)
    assert not store.complete_chunk("j1", 0, 31, 1)      # the duplicate run neither adds nor replaces
    info = store.info("j1")
    # issue 19: counters move only on a chunk's first completion (was (31, 1): the last write won,
    # which let a later, worse attempt change a completed chunk's counts)
    assert (info.succeeded, info.failed, info.chunks_done, info.state) == (30, 2, 1, "running")
    assert info.started_at is not None


def test_last_chunk_finishes_only_once_sealed(store):
    store.create("j2", model="hardnet68", dest=None)
    store.start_chunk("j2", 0)
    assert not store.complete_chunk("j2", 0, 4, 0)          # total unknown yet: not finished
    store.start_chunk("j2", 1)
    assert not store.complete_chunk("j2", 1, 3, 1)
    assert store.seal("j2", total=8, chunks=2)              # everything already done: caller finalises
    store.mark_done("j2")
    info = store.info("j2")
    assert info.state == "done" and info.total == 8 and info.finished_at is not None


def test_seal_before_completion_and_dead_letters(store):
    store.create("j3", model="hardnet68", dest="s3://b/p/")
    assert not store.seal("j3", total=10, chunks=2)
    store.complete_chunk("j3", 0, 5, 0)
    # chunk 1 is dead-lettered: counted as failed, listed, and the job can still finish
    assert store.complete_dead("j3", 1, 5, "boom", 5) == 1
    info = store.info("j3")
    assert (info.failed, info.dead_chunks) == (5, 1)
    assert info.error_codes == {"chunk_failed": 5}
    assert [d.chunk for d in store.dead_letters("j3")] == [1]
    # a re-drive that succeeds replaces the failure and clears the dead letter
    store.reset_attempts("j3", 1)
    assert store.start_chunk("j3", 1)[1] == 1
    assert store.complete_chunk("j3", 1, 5, 0)
    info = store.info("j3")
    assert (info.succeeded, info.failed, info.dead_chunks) == (10, 0, 0)
    assert store.dead_letters("j3") == [] and store.info("j3").error_codes == {}


def test_cancelled_job_never_finishes(store):
    store.create("j4", model="hardnet68", dest=None)
    store.seal("j4", total=1, chunks=1)
    assert store.cancel("j4") == "cancelled"
    assert store.start_chunk("j4", 0)[0] == "cancelled"
    assert not store.complete_chunk("j4", 0, 1, 0)
    assert store.info("j4").state == "cancelled"
    assert store.finish("j4", "done") == "cancelled"          # a final state never overwrites it
    assert store.cancel("nope") == "missing"


def test_redis_results_parts(store):
    store.create("j5", model="m", dest=None)
    store.put_part("j5", 0, b'{"uri":"a"}\n')
    store.put_part("j5", 0, b'{"uri":"b"}\n')                # retried chunk overwrites
    assert list(store.iter_parts("j5", 2)) == [(0, '{"uri":"b"}\n'), (1, None)]


def test_cancel_of_a_finished_job_changes_nothing(store):
    store.create("j6", model="m", dest=None)
    store.seal("j6", total=1, chunks=1)
    assert store.complete_chunk("j6", 0, 1, 0)
    store.finish("j6", "done")
    before = store.raw("j6")
    assert store.cancel("j6") == "done"
    assert store.raw("j6") == before


def test_dead_letter_never_replaces_a_completed_chunk(store):
    store.create("j7", model="m", dest=None)
    store.seal("j7", total=6, chunks=2)
    assert not store.complete_chunk("j7", 0, 2, 1, codes={"decode_error": 1}, weights="random")
    # a late redelivery of chunk 0 past max attempts: the completed outcome stands
    assert store.complete_dead("j7", 0, 3, "worker died", 6) is None
    info = store.info("j7")
    assert (info.succeeded, info.failed, info.dead_chunks, info.error_codes) == (2, 1, 0, {"decode_error": 1})
    # a dead letter followed by a successful attempt is replaced, codes included
    assert store.complete_dead("j7", 1, 3, "boom", 5) == 1
    assert store.info("j7").error_codes == {"chunk_failed": 3, "decode_error": 1}
    assert store.complete_chunk("j7", 1, 3, 0)
    info = store.info("j7")
    assert (info.succeeded, info.failed, info.dead_chunks, info.error_codes) == (5, 1, 0, {"decode_error": 1})
    assert store.weights_used("j7") == ["random"]


def test_start_keeps_the_sweeper_bookkeeping(store):
    store.create("j8", model="m", dest=None, queue="qq")
    store.mark_sent("j8", [0, 1], at=100.0)
    assert store.start_chunk("j8", 1) == ("queued", 1)
    seen = store.seen("j8")
    assert seen[0] == ("q", 100.0) and seen[1][0] == "s"
    assert store.watermark("qq") == 100.0


def test_a_wait_sees_the_end_at_once_and_every_waiter_sees_it(store):
    """`--wait` blocks on hnq:job:ID:ended (pushed by the scripts that end a job) instead of
    sleeping a whole poll interval; two waiters both see it; a stale end (job reopened) is not."""
    import threading
    import time

    store.create("w1", model="hardnet68", dest=None)
    assert store.wait_ended("w1", 0.05) is None
    got = []
    waiters = [threading.Thread(target=lambda: got.append(store.wait_ended("w1", 10))) for _ in range(2)]
    t0 = time.monotonic()
    for t in waiters:
        t.start()
    time.sleep(0.2)
    assert store.finish("w1", "done") == "done"
    for t in waiters:
        t.join()
    assert got == ["done", "done"] and time.monotonic() - t0 < 2.0
    store.reopen("w1")                      # resume: running again, the old end is gone
    assert store.wait_ended("w1", 0.05) is None
    assert store.cancel("w1") == "cancelled" and store.wait_ended("w1", 1) == "cancelled"
    # an end pushed, then the job reopened by a path that did not clear it: dropped, not a busy loop
    store.r.hset(store.key("w1"), "state", "running")
    t0 = time.monotonic()
    assert store.wait_ended("w1", 0.3) is None and time.monotonic() - t0 >= 0.25
    assert store.wait_ended("w1", 0.05) is None


def test_a_completed_chunk_leaves_no_sweeper_bookkeeping(store):
    """Per finished chunk Redis keeps its outcome (done, codes) and attempts, not its seen entry."""
    store.create("j9", model="m", dest=None, queue="qq")
    store.mark_sent("j9", [0, 1])
    store.start_chunk("j9", 0)
    store.start_chunk("j9", 1)
    store.complete_chunk("j9", 0, 8, 0)
    assert set(store.seen("j9")) == {1}
    assert sorted(store.r.hkeys(store.key("j9", "attempts"))) == ["0", "1"]
    assert store.complete_dead("j9", 1, 8, "boom", 5) == 0     # a dead letter keeps it (redrive)
    assert set(store.seen("j9")) == {1}
