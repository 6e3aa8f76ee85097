"""The streaming engine on the CPU with a scripted fetch function (no network): order, batches
across chunks, completion order, per-image retries and codes, the storage-down rule, cancel,
bounded queues and the batcher's cut rules. The same engine runs in the workers
(tests/integration/test_engine_queue.py drives it through Redis, moto S3 and the fault proxy)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster import image_bytes
from hnq.errors import ErrorCode, ImageError, TransientError
from hnq.storage import Fetched
from worker.engine import (ChunkCancelled, DeviceRunner, Engine, EngineConfig, RetryPolicy,
                           StorageDown, allowed_cpus)
from worker.engine.batch import Batcher
from worker.engine.decode import BoundedQueue
from worker.engine.fetch import WorkQueue
from worker.engine.classifier import Classifier

FAST_RETRY = RetryPolicy(attempts=3, deadline_s=30, backoff_s=0.02, backoff_max_s=0.05)


@pytest.fixture(scope="module")
def clf():
    return Classifier("hardnet39ds", "random", device="cpu", batch_size=32)


class Store:
    """A scripted object store: per-URI behaviour, call counts, an optional delay per URI."""

    def __init__(self, n: int = 64):
        self.blobs = {f"mem://img/{i}": image_bytes(i) for i in range(n)}
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.transient_until: dict[str, int] = {}   # uri -> fail this many times (-1: forever)
        self.permanent: dict[str, ImageError] = {}
        self.delay: dict[str, float] = {}
        self.code = ErrorCode.fetch_error

    @property
    def uris(self) -> list[str]:
        return list(self.blobs)

    def fetch(self, uri: str) -> Fetched:
        with self.lock:
            self.calls[uri] = n = self.calls.get(uri, 0) + 1
        time.sleep(self.delay.get(uri, 0.001))
        left = self.transient_until.get(uri, 0)
        if left == -1 or n <= left:
            raise TransientError(f"{uri}: 503 SlowDown", self.code)
        if uri in self.permanent:
            raise self.permanent[uri]
        data = self.blobs[uri]
        return Fetched(data=data, etag=f"etag-{uri[-3:]}", size=len(data))


def make_engine(clf, store: Store, *, batch: int = 32, retry: RetryPolicy = FAST_RETRY,
                wait_s: float = 0.05, fetch_threads: int = 16) -> Engine:
    runner = DeviceRunner(clf.net, clf.device, batch, amp=False)
    cfg = EngineConfig(batch_size=batch, fetch_threads=fetch_threads, decode_threads=2,
                       batch_wait_s=wait_s, retry=retry)
    return Engine(fetch=store.fetch, decode=clf.decode, runner=runner, record=clf.record, cfg=cfg)


def test_records_in_chunk_order_and_batches_span_chunks(clf):
    store = Store(64)
    eng = make_engine(clf, store, batch=32)
    try:
        uris = store.uris
        chunks = [eng.submit(uris[i:i + 4], job_id="j", name=f"j/{i // 4}") for i in range(0, 64, 4)]
        out = [c.result(120) for c in chunks]
        for c, recs in zip(chunks, out):
            assert [r.uri for r in recs] == c.uris
            assert all(r.status == "ok" and len(r.top5) == 5 and r.job_id == "j" for r in recs)
            assert all(r.etag == f"etag-{r.uri[-3:]}" and r.size > 0 for r in recs)
        st = eng.stats()
        # 16 chunks of 4 went through batches of up to 32: batches mix chunks
        assert st["device"]["largest"] > 4, st
        assert st["device"]["images"] == 64 and st["chunks_in_flight"] == 0
        assert st["queues"]["in_flight"] == 0
        # the same image gives the same labels as the Classifier's own API
        ref = clf.classify([(uris[5], store.blobs[uris[5]])])[0]
        got = out[1][1]
        assert [t.index for t in got.top5] == [t.index for t in ref.top5]
    finally:
        eng.close()


def test_a_slow_object_holds_back_only_its_own_chunk(clf):
    store = Store(16)
    slow = store.uris[0]
    store.delay[slow] = 3.0
    eng = make_engine(clf, store, batch=8)
    try:
        a = eng.submit(store.uris[:8], name="a")      # holds the slow object
        b = eng.submit(store.uris[8:], name="b")
        t0 = time.monotonic()
        b.result(60)
        b_time = time.monotonic() - t0
        assert not a.wait(0), "chunk a cannot be done before its slow object"
        a.result(60)
        a_time = time.monotonic() - t0
        assert b_time < a_time and a_time >= 2.9
        assert [r.uri for r in a.records] == store.uris[:8]
    finally:
        eng.close()


def test_transient_failures_are_retried_per_image(clf):
    store = Store(16)
    flaky = store.uris[3]
    store.transient_until[flaky] = 2            # fails twice, then answers
    eng = make_engine(clf, store, batch=16)
    try:
        recs = eng.submit(store.uris, name="c").result(60)
        assert all(r.status == "ok" for r in recs)
        assert store.calls[flaky] == 3
        assert eng.stats()["fetch"]["retries"] == 2
    finally:
        eng.close()


@pytest.mark.parametrize("code", [ErrorCode.throttled, ErrorCode.timeout, ErrorCode.fetch_error]
                         if hasattr(ErrorCode, "throttled") else [ErrorCode.timeout, ErrorCode.fetch_error])
def test_a_never_served_object_gets_its_own_coded_record(clf, code):
    store = Store(64)
    bad = store.uris[10]
    store.transient_until[bad] = -1
    store.code = code
    store.permanent[store.uris[20]] = ImageError("no such object", ErrorCode.not_found)
    eng = make_engine(clf, store, batch=32)
    try:
        recs = eng.submit(store.uris, name="d").result(60)
        by = {r.uri: r for r in recs}
        assert by[bad].status == "error" and by[bad].error.code == code.value
        assert "gave up after 3 attempts" in by[bad].error.message
        assert by[store.uris[20]].error.code == "not_found"
        assert store.calls[bad] == FAST_RETRY.attempts and store.calls[store.uris[20]] == 1
        assert sum(r.status == "ok" for r in recs) == 62
    finally:
        eng.close()


def test_deadline_bounds_the_retries(clf):
    store = Store(4)
    bad = store.uris[0]
    store.transient_until[bad] = -1
    retry = RetryPolicy(attempts=100, deadline_s=0.5, backoff_s=0.1, backoff_max_s=0.2)
    eng = make_engine(clf, store, batch=4, retry=retry)
    try:
        t0 = time.monotonic()
        recs = eng.submit(store.uris, name="e").result(30)
        assert recs[0].error is not None and time.monotonic() - t0 < 5
        assert 2 <= store.calls[bad] < 20
    finally:
        eng.close()


def test_storage_down_fails_the_chunk_instead_of_recording_failures(clf):
    store = Store(8)
    for u in store.uris[:5]:                    # 5 of 8: most of the chunk
        store.transient_until[u] = -1
    eng = make_engine(clf, store, batch=8)
    try:
        ch = eng.submit(store.uris, name="f")
        with pytest.raises(StorageDown, match="5 of 8"):
            ch.result(60)
        # a minority of failures is still recorded per image
        ch2 = eng.submit(store.uris[3:], name="g")   # 2 of 5 failing
        recs = ch2.result(60)
        assert sum(r.status == "error" for r in recs) == 2
        # ... and `hardnet classify` turns the rule off: records for all
        ch3 = eng.submit(store.uris, name="h", storage_down_retry=False)
        assert sum(r.status == "error" for r in ch3.result(60)) == 5
        deadline = time.monotonic() + 10
        while eng.stats()["queues"]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.stats()["queues"]["in_flight"] == 0, "skipped images must leave the engine's count"
    finally:
        eng.close()


def test_cancel_drops_the_rest_of_a_chunk(clf):
    store = Store(40)
    for u in store.uris:
        store.delay[u] = 0.2
    eng = make_engine(clf, store, batch=8, fetch_threads=4)
    try:
        ch = eng.submit(store.uris, name="k")
        other = eng.submit(store.uris[:4], name="other")
        time.sleep(0.5)
        ch.cancel()
        with pytest.raises(ChunkCancelled):
            ch.result(1)
        assert len(other.result(60)) == 4
        deadline = time.monotonic() + 10
        while eng.stats()["queues"]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.stats()["queues"]["in_flight"] == 0
        assert sum(store.calls.values()) < 40 + 4, "the cancelled chunk's remaining images were fetched"
    finally:
        eng.close()


def test_empty_chunk_and_closed_engine(clf):
    store = Store(2)
    eng = make_engine(clf, store)
    assert eng.submit([], name="empty").result(1) == []
    eng.close()
    with pytest.raises(RuntimeError):
        eng.submit(store.uris)


def test_bounded_queue_blocks_producers_at_its_bounds():
    q = BoundedQueue(max_items=3, max_bytes=100)
    for i in range(3):
        assert q.put(i, 10)
    done = threading.Event()
    threading.Thread(target=lambda: (q.put(3, 10), done.set()), daemon=True).start()
    assert not done.wait(0.2), "a 4th item must wait for room"
    assert q.get() == 0
    assert done.wait(2)
    # the byte bound: a big item waits until the queue has drained, then passes alone
    q2 = BoundedQueue(max_items=10, max_bytes=100)
    q2.put("a", 60)
    big = threading.Event()
    threading.Thread(target=lambda: (q2.put("b", 500), big.set()), daemon=True).start()
    assert not big.wait(0.2)
    assert q2.get() == "a" and big.wait(2) and q2.depth() == (1, 500)


def test_batcher_cuts_full_batches_or_on_idleness():
    b = Batcher(size=4, max_wait_s=0.2, capacity=8)
    b.expect(10)
    for i in range(5):
        b.put(i)
    assert b.take() == [0, 1, 2, 3]                 # full
    t0 = time.monotonic()
    assert b.take() == [4]                          # short: after max_wait, more are on their way
    assert time.monotonic() - t0 >= 0.15
    b.put(5)
    b.forget(4)                                     # the rest failed: nothing else is coming
    t0 = time.monotonic()
    assert b.take() == [5] and time.monotonic() - t0 < 0.1
    assert b.take(block=False) == []
    b.close()
    assert b.take() is None


def test_work_queue_hands_out_due_retries_first():
    q = WorkQueue()
    q.put_many(["new1", "new2"])
    q.put_later("retry", time.monotonic() - 1)
    q.put_later("later", time.monotonic() + 0.3)
    assert [q.get(), q.get(), q.get()] == ["retry", "new1", "new2"]
    t0 = time.monotonic()
    assert q.get() == "later" and time.monotonic() - t0 >= 0.25
    q.close()
    assert q.get() is None


@pytest.mark.parametrize("torchscript", ["off", "on"])
def test_device_runner_matches_the_classifier_and_pads(clf, samples_dir, torchscript):
    blobs = [p.read_bytes() for p in sorted(samples_dir.glob("*.*g"))]
    batch, _ = clf.preprocess(blobs)
    ref = clf.predict(batch)
    for pad in (False, True):
        r = DeviceRunner(clf.net, clf.device, 8, amp=False, torchscript=torchscript)
        assert r.torchscript == (torchscript == "on")
        assert isinstance(r.net, torch.jit.ScriptModule) == r.torchscript
        r.pad = pad
        # the traced forward takes any batch size (traced at 2): the full batch and a short one
        for n in (len(blobs), 1):
            scores, idx, ms = r.finish(r.launch(list(batch[:n])))
            assert ms is None and len(idx) == n
            assert [[t.index for t in row] for row in ref[:n]] == idx
            assert all(abs(s - t.score) < 1e-5 for row, srow in zip(ref, scores) for t, s in zip(row, srow))


@pytest.mark.parametrize("mode,device,amp,compile,expected", [
    ("auto", "cpu", False, False, True),     # the CPU worker's default
    ("auto", "cuda", False, False, False),   # CUDA: CUDA graphs are its option for launch overhead
    ("on", "cuda", False, False, True),
    ("auto", "cpu", True, False, False),     # a trace does not carry autocast
    ("on", "cpu", False, True, False),       # torch.compile wins
    ("off", "cpu", False, False, False),
])
def test_torchscript_rules(mode, device, amp, compile, expected):
    from worker.engine.device import use_torchscript

    assert use_torchscript(mode, torch.device(device), amp=amp, compile=compile) is expected
    with pytest.raises(ValueError):
        use_torchscript("sometimes", torch.device("cpu"), amp=False, compile=False)


def test_a_failed_trace_falls_back_to_the_eager_model(caplog):
    from worker.engine.device import trace

    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return {"not": "a tensor"}   # tracing refuses non-tensor outputs

    net = Untraceable()
    assert trace(net, torch.device("cpu")) is net
    assert "TorchScript trace failed" in caplog.text


def test_allowed_cpus_is_within_the_affinity_mask():
    import os

    assert 1 <= allowed_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("device, setting, env, expected", [
    ("cuda", 0, {}, 1),                            # decoding already has one thread per CPU
    ("cuda", 0, {"OMP_NUM_THREADS": "4"}, None),   # the operator's choice stands
    ("cuda", 6, {"OMP_NUM_THREADS": "4"}, 6),      # HARDNET_TORCH_THREADS wins
    ("cpu", 0, {}, None),                          # the forward pass uses torch's own
    ("cpu", 3, {}, 3),
])
def test_intra_op_threads_rule(device, setting, env, expected):
    from worker.engine.cpus import intra_op_threads

    assert intra_op_threads(device, setting, env) == expected


def test_build_engine_sets_torch_threads_for_the_process(clf, tmp_path):
    from hnq.storage import FetchPolicy
    from worker.engine import build_engine

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build_engine(clf, FetchPolicy(file_roots=(str(tmp_path),)), torchscript="off").close()
        assert torch.get_num_threads() == 2         # on the CPU, left alone
        build_engine(clf, FetchPolicy(file_roots=(str(tmp_path),)), torchscript="off",
                     torch_threads=1).close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_device_runner_agrees_with_cpu_fp32(graphs, samples_dir):
    cpu = Classifier("hardnet68", "random", device="cpu", batch_size=8)
    gpu = Classifier("hardnet68", "random", device="cuda", batch_size=8)
    blobs = [p.read_bytes() for p in sorted(samples_dir.glob("*.*g"))]
    batch, _ = cpu.preprocess(blobs)
    ref = cpu.predict(batch)
    r = DeviceRunner(gpu.net, gpu.device, 8, amp=gpu.amp, cuda_graphs=graphs)
    # two batches in flight at once (double-buffered pinned inputs), finished in order
    p1 = r.launch(list(batch))
    p2 = r.launch(list(batch[:3]))
    s1, i1, ms1 = r.finish(p1)
    s2, i2, _ = r.finish(p2)
    assert ms1 is not None and ms1 > 0
    top1 = [row[0].index for row in ref]
    agree = sum(a[0] == b for a, b in zip(i1, top1)) / len(top1)
    print(f"\nMEASURED cuda runner (graphs={graphs}, amp={gpu.amp}) top-1 agreement with CPU fp32: {agree:.2f}")
    assert agree >= 0.8
    assert i2 == i1[:3]


def test_batched_decode_path_routes_eligible_blobs_and_isolates_failures(clf):
    """The engine's GPU-decode wiring, run on the CPU: eligible blobs (JPEGs here) go to the
    batched decoder in groups, the rest to the CPU threads; a blob the batched decoder fails
    is that image's record only."""
    store = Store(24)
    for i in range(0, 24, 3):                       # every third image a PNG: CPU threads
        store.blobs[store.uris[i]] = image_bytes(i, "PNG")
    calls = []

    def batch_decode(blobs):
        calls.append(len(blobs))
        out = []
        for b in blobs:
            if b is store.blobs[store.uris[4]]:
                out.append(ImageError("nvjpeg says no", ErrorCode.decode_error))
            else:
                out.append(clf.decode(b))
        return out

    runner = DeviceRunner(clf.net, clf.device, 16, amp=False)
    cfg = EngineConfig(batch_size=16, fetch_threads=8, decode_threads=2, batch_wait_s=0.05,
                       retry=FAST_RETRY, batch_decode=batch_decode,
                       gpu_eligible=lambda b: b[:2] == b"\xff\xd8")
    eng = Engine(fetch=store.fetch, decode=clf.decode, runner=runner, record=clf.record, cfg=cfg)
    try:
        recs = eng.submit(store.uris, name="gpu").result(60)
        assert [r.uri for r in recs] == store.uris
        bad = [r for r in recs if r.status != "ok"]
        assert [r.uri for r in bad] == [store.uris[4]] and bad[0].error.code == "decode_error"
        assert sum(calls) == 16, calls              # the 16 JPEGs, none of the 8 PNGs
        assert eng.stats()["decode"]["items"] == 24
    finally:
        eng.close()


def test_the_engine_raises_the_gc_threshold_and_never_lowers_it(clf):
    import gc

    from worker.engine.engine import raise_gc_threshold

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        raise_gc_threshold(0)
        assert gc.get_threshold() == (700, 10, 10)
        eng = make_engine(clf, Store(1))        # EngineConfig's default: 10,000
        eng.close()
        assert gc.get_threshold() == (10_000, 10, 10)
        raise_gc_threshold(5_000)
        assert gc.get_threshold() == (10_000, 10, 10)
    finally:
        gc.set_threshold(*saved)


def test_young_collections_during_a_run_follow_the_threshold(clf):
    """Why the engine raises the threshold: each image's record (a dozen GC-tracked objects) stays
    alive until its chunk is done, and every young collection rescans what has not been freed."""
    import gc

    store = Store(64)
    eng = make_engine(clf, store, batch=32)
    saved = gc.get_threshold()
    runs: list[int] = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 0:
            runs.append(1)

    collections = {}
    try:
        eng.submit(store.uris).result(120)          # warm-up: the first batch, lazy imports
        gc.callbacks.append(count)
        for threshold in (700, 10_000):
            gc.set_threshold(threshold, 10, 10)
            runs.clear()
            chunks = [eng.submit(store.uris) for _ in range(8)]
            recs = [r for c in chunks for r in c.result(120)]
            collections[threshold] = len(runs)
            assert len(recs) == 512 and all(r.status == "ok" for r in recs)
    finally:
        if count in gc.callbacks:
            gc.callbacks.remove(count)
        gc.set_threshold(*saved)
        eng.close()
    print(f"young collections over 512 images: {collections}")
    assert collections[700] >= 3 * max(1, collections[10_000])


def _fetch_items(n: int):
    from types import SimpleNamespace

    from worker.engine.engine import _Item

    chunk = SimpleNamespace(closed=False)
    return [_Item(chunk, i, f"mem://img/{i}") for i in range(n)]


@pytest.mark.parametrize("items, has_room, expected", [
    (96, True, 24),     # every fetcher waits on the store, more items ready: grows to the maximum
    (96, False, 4),     # decoding is behind (its queue above half): more fetchers would not help
    (3, True, 4),       # nothing more is ready: no fetcher to add
])
def test_fetchers_are_added_only_while_the_store_is_what_holds_back(items, has_room, expected):
    from worker.engine.fetch import FetchStage

    got = threading.Semaphore(0)

    def slow_fetch(uri):
        time.sleep(0.15)
        return Fetched(data=b"x", etag=None, size=1)

    stage = FetchStage(slow_fetch, 24, FAST_RETRY, lambda item, fetched: got.release(),
                       lambda *a: None, has_room=lambda: has_room, first_threads=4)
    try:
        assert stage.threads == 4
        stage.submit(_fetch_items(items))
        for _ in range(items):
            assert got.acquire(timeout=60)
        assert stage.threads == expected
    finally:
        stage.close()
