"""Chunk admission (worker/admission.py): how many chunk messages a worker holds, in images."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hnq.settings import TASK_CLASSIFY, TASK_FINALIZE
from worker.admission import Admission, chunk_size_of


def test_min_chunks_always_then_more_while_images_are_short():
    a = Admission(min_chunks=2, max_chunks=8, images=64)
    assert a.wants_more([]) and a.wants_more([512])              # below the minimum: always
    assert not a.wants_more([512, 512])                           # large chunks: the minimum only
    assert a.wants_more([16, 16]) and a.wants_more([16, 16, 16])  # small chunks: more...
    assert not a.wants_more([16, 16, 16, 16])                     # ...until 64 images are held
    assert a.wants_more([16, 16, 16, 15])                         # one more chunk may overshoot
    assert not a.wants_more([1] * 8)                              # never beyond the pool


def test_unknown_sizes_and_an_unconfigured_engine_take_no_more_than_the_minimum():
    a = Admission(min_chunks=1, max_chunks=8)           # images unknown: engine not built yet
    assert a.wants_more([]) and not a.wants_more([4])
    a.configure(images=32)
    assert a.wants_more([4]) and not a.wants_more([4, None])   # an unreadable message counts full


def test_max_never_below_min():
    assert Admission(min_chunks=6, max_chunks=2, images=100).max_chunks == 6


def test_chunk_size_of_reads_the_message_count():
    classify = lambda payload: SimpleNamespace(name=TASK_CLASSIFY, args=(payload,))  # noqa: E731
    assert chunk_size_of(classify({"job_id": "j", "chunk": 0, "count": 16})) == 16
    assert chunk_size_of(classify({"count": -3})) is None
    assert chunk_size_of(classify("not a dict")) is None
    assert chunk_size_of(SimpleNamespace(name=TASK_CLASSIFY, args=())) is None
    assert chunk_size_of(SimpleNamespace(name=TASK_FINALIZE, args=("job", None))) == 0   # no images


def test_the_gate_never_raises(monkeypatch, caplog):
    import worker.admission as adm

    def broken():
        raise RuntimeError("celery state unreadable")

    monkeypatch.setattr(adm, "held_chunk_sizes", broken)
    gate = Admission(min_chunks=1, max_chunks=4, images=8)
    assert gate() is True and gate() is True             # falls back to the prefetch limit
    assert caplog.text.count("chunk admission check failed") == 1


def test_the_gate_reads_celerys_reserved_requests(monkeypatch):
    from celery.worker import state

    class Request:     # hashable and weakly referenced, as Celery's requests
        name, args = TASK_CLASSIFY, ({"count": 16},)

    import weakref

    reqs = [Request() for _ in range(3)]
    monkeypatch.setattr(state, "reserved_requests", weakref.WeakSet(reqs))
    assert Admission(min_chunks=1, max_chunks=8, images=64)() is True     # 48 < 64
    assert Admission(min_chunks=1, max_chunks=8, images=48)() is False


def test_the_worker_channel_asks_the_gate(monkeypatch):
    from worker import transport

    qos = transport.GatedQoS.__new__(transport.GatedQoS)      # the prefetch side: always room
    monkeypatch.setattr(transport.kredis.QoS, "can_consume", lambda self: True)
    for gate, expected in ((None, True), (lambda: True, True), (lambda: False, False)):
        monkeypatch.setattr(transport, "_gate", gate)
        assert qos.can_consume() is expected
    monkeypatch.setattr(transport.kredis.QoS, "can_consume", lambda self: False)
    monkeypatch.setattr(transport, "_gate", lambda: True)
    assert qos.can_consume() is False                          # the prefetch limit still holds
    assert transport.SafeChannel.QoS is transport.GatedQoS


def test_a_restore_on_a_lost_connection_does_not_stop_the_worker(monkeypatch, caplog):
    """kombu's close after a lost broker connection restores the unacked messages through a pool
    it rebuilds from connection info that can be gone (AttributeError: seen killing a worker in a
    Sentinel failover): warned, not raised; any other error still goes up."""
    from worker import transport

    qos = transport.GatedQoS.__new__(transport.GatedQoS)
    qos._delivered = {"tag-1": None, "tag-2": None}

    def gone(self, stderr=None):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    monkeypatch.setattr(transport.kredis.QoS, "restore_unacked_once", gone)
    with caplog.at_level("WARNING", logger="hardnet.worker"):
        qos.restore_unacked_once()
    assert "could not put this worker's 2 unacknowledged message(s) back" in caplog.text

    def broken(self, stderr=None):
        raise ValueError("something else")

    monkeypatch.setattr(transport.kredis.QoS, "restore_unacked_once", broken)
    with pytest.raises(ValueError):
        qos.restore_unacked_once()


@pytest.mark.parametrize("env,pool", [({}, 32), ({"HARDNET_CHUNKS_IN_FLIGHT": "40"}, 40),
                                      ({"HARDNET_MAX_CHUNKS_IN_FLIGHT": "8"}, 8)])
def test_pool_size(monkeypatch, env, pool):
    from worker.settings import WorkerSettings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert WorkerSettings().pool_size == pool
