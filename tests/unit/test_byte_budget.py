"""HARDNET_BYTES_IN_FLIGHT: the engine's byte budget (worker.engine.budget) on its own, in the
engine with a scripted store (reservation before the body, release on error and on cancel, an
object larger than the budget alone, no deadlock at a 1-byte budget), and the storage backends'
``on_size`` (file, http, S3 through boto3 and obstore against moto). The worker-process test with
large objects is tests/integration/test_bytes_in_flight.py."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster import image_bytes
from hnq.errors import ErrorCode, ImageError, TransientError
from hnq.objects import SourceObject
from hnq.storage import FetchPolicy, Fetched, fetch
from worker.engine import DeviceRunner, Engine, EngineConfig, RetryPolicy
from worker.engine.budget import ByteBudget, default_bytes_in_flight, MIN_DEFAULT
from worker.engine.classifier import Classifier
from worker.engine.fetch import FIRST_ESTIMATE
from worker.settings import WorkerSettings

FAST_RETRY = RetryPolicy(attempts=3, deadline_s=30, backoff_s=0.02, backoff_max_s=0.05)


def _reserve_in_thread(budget: ByteBudget, n: int, **kw):
    out: dict = {}

    def run():
        out["ok"] = budget.reserve(n, **kw)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


# ---------------------------------------------------------------- the budget alone

def test_reserve_and_give_back():
    b = ByteBudget(100)
    assert b.reserve(60) and b.reserve(40)
    assert b.used == 100 and b.peak == 100 and b.waits == 0
    b.give_back(60)
    b.give_back(40)
    assert b.used == 0 and b.peak == 100


def test_waiter_is_woken_by_a_release_and_holds_nothing_meanwhile():
    b = ByteBudget(100)
    assert b.reserve(80)
    t, out = _reserve_in_thread(b, 30)
    assert _until(lambda: b.waiting() == 1)
    assert b.used == 80 and t.is_alive()           # it waits, holding nothing
    b.give_back(80)                                # the release grants it, and wakes it
    t.join(10)
    assert not t.is_alive() and out["ok"] and b.used == 30 and b.waiting() == 0 and b.waits == 1


def test_an_object_larger_than_the_budget_goes_alone():
    b = ByteBudget(10)
    assert b.reserve(5)
    big, out = _reserve_in_thread(b, 1000)
    assert _until(lambda: b.waiting() == 1)
    small, out2 = _reserve_in_thread(b, 1)         # queued behind the big one: no overtaking
    assert _until(lambda: b.waiting() == 2)
    b.give_back(5)
    big.join(10)
    assert out["ok"] and b.used == 1000            # granted when nothing else was held
    assert small.is_alive() and b.waiting() == 1   # and nothing else while it is held
    b.give_back(1000)
    small.join(10)
    assert out2["ok"] and b.used == 1


def test_a_first_waiter_goes_before_new_arrivals_and_after_earlier_firsts():
    b = ByteBudget(10)
    assert b.reserve(10)
    order = []

    def run(tag, n, first):
        assert b.reserve(n, first=first)
        order.append(tag)
        b.give_back(n)

    ts = []
    for tag, first in (("new1", False), ("grow1", True), ("grow2", True), ("new2", False)):
        ts.append(threading.Thread(target=run, args=(tag, 10, first), daemon=True))
        ts[-1].start()
        assert _until(lambda: b.waiting() == len(ts))
    b.give_back(10)
    for t in ts:
        t.join(10)
    assert order == ["grow1", "grow2", "new1", "new2"]


def test_a_cancelled_waiter_leaves_and_unblocks_those_behind_it():
    b = ByteBudget(10)
    assert b.reserve(8)
    stop = threading.Event()
    big, out = _reserve_in_thread(b, 9, cancelled=stop.is_set)
    assert _until(lambda: b.waiting() == 1)
    small, out2 = _reserve_in_thread(b, 2)         # fits, but queued behind the big one
    assert _until(lambda: b.waiting() == 2)
    stop.set()
    big.join(10)
    small.join(10)
    assert out == {"ok": False} and out2 == {"ok": True}
    assert b.used == 10 and b.waiting() == 0


def test_close_wakes_every_waiter():
    b = ByteBudget(1)
    assert b.reserve(1)
    ts = [_reserve_in_thread(b, 1) for _ in range(3)]
    assert _until(lambda: b.waiting() == 3)
    b.close()
    for t, out in ts:
        t.join(10)
        assert out == {"ok": False}
    assert not b.reserve(1)


def test_default_is_a_quarter_of_the_memory_with_a_floor():
    assert default_bytes_in_flight(400) == 100 * 2**20        # HARDNET_MAX_MEMORY_PER_CHILD_MB
    assert default_bytes_in_flight(64) == MIN_DEFAULT           # floor
    assert default_bytes_in_flight() >= MIN_DEFAULT


def test_setting_accepts_units_and_refuses_nonsense(monkeypatch):
    monkeypatch.setenv("HARDNET_BYTES_IN_FLIGHT", "64MiB")
    assert WorkerSettings().bytes_in_flight == 64 * 2**20
    monkeypatch.setenv("HARDNET_BYTES_IN_FLIGHT", "1.5G")
    assert WorkerSettings().bytes_in_flight == 1_500_000_000
    for bad in ("lots", "-5", "3 parsecs"):
        monkeypatch.setenv("HARDNET_BYTES_IN_FLIGHT", bad)
        with pytest.raises(Exception, match="HARDNET_BYTES_IN_FLIGHT"):
            WorkerSettings()


# ---------------------------------------------------------------- in the engine

@pytest.fixture(scope="module")
def clf():
    return Classifier("hardnet39ds", "random", device="cpu", batch_size=8)


class SizedStore:
    """A store whose fetch announces each object's size through ``on_size`` before its "body" is
    read, and which counts the bytes between that moment and the end of the image's decode
    (``live``), independently of the budget's own books."""

    def __init__(self, n: int, *, announce: bool = True, pad: int = 0):
        # images of different sizes: padding after the JPEG's end (decoders ignore it)
        self.blobs = {f"mem://img/{i}": image_bytes(i) + b"\0" * (pad * (i % 4)) for i in range(n)}
        self.announce = announce
        self.lock = threading.Lock()
        self.live = 0
        self.max_live = 0
        self.calls: dict[str, int] = {}
        self.fail_after_size: dict[str, Exception] = {}
        self.transient_once: set[str] = set()
        self.delay = 0.0
        self.used_at_size: list[tuple[int, int]] = []   # (budget.used when on_size returned, n)
        self.engine: Engine | None = None

    @property
    def uris(self) -> list[str]:
        return list(self.blobs)

    def fetch(self, uri: str, on_size=None) -> Fetched:
        with self.lock:
            self.calls[uri] = k = self.calls.get(uri, 0) + 1
        data = self.blobs[uri]
        on_size(len(data) if self.announce else None)
        self.used_at_size.append((self.engine.budget.used, len(data)))
        if uri in self.transient_once and k == 1:
            raise TransientError(f"{uri}: reset mid-body", ErrorCode.fetch_error)
        if uri in self.fail_after_size:
            raise self.fail_after_size[uri]
        with self.lock:
            self.live += len(data)
            self.max_live = max(self.max_live, self.live)
        time.sleep(self.delay)
        return Fetched(data=data, etag=None, size=len(data))

    def decode(self, clf):
        def run(data):
            try:
                return clf.decode(data)
            finally:
                with self.lock:
                    self.live -= len(data)
        return run


def make_engine(clf, store: SizedStore, budget: int, *, fetch_threads: int = 8,
                unknown: int = 50 * 2**20) -> Engine:
    runner = DeviceRunner(clf.net, clf.device, 8, amp=False)
    cfg = EngineConfig(batch_size=8, fetch_threads=fetch_threads, first_fetch_threads=fetch_threads,
                       decode_threads=2, batch_wait_s=0.02, retry=FAST_RETRY,
                       bytes_in_flight=budget, unknown_size_bytes=unknown)
    eng = Engine(fetch=store.fetch, decode=store.decode(clf), runner=runner, record=clf.record, cfg=cfg)
    store.engine = eng
    return eng


def test_bytes_between_size_and_decode_stay_within_the_budget(clf):
    store = SizedStore(48, pad=3000)
    sizes = [len(b) for b in store.blobs.values()]
    budget = 3 * max(sizes)
    eng = make_engine(clf, store, budget)
    try:
        recs = [r for c in [eng.submit(store.uris[i:i + 8]) for i in range(0, 48, 8)]
                for r in c.result(120)]
        assert [r.status for r in recs] == ["ok"] * 48
        # the reservation was in place before every body was read
        assert all(used >= n for used, n in store.used_at_size)
        print(f"\nMEASURED budget {budget} B: most bytes between size and decode {store.max_live} B, "
              f"budget peak {eng.budget.peak} B, waits {eng.budget.waits}")
        assert store.max_live <= budget and eng.budget.peak <= budget
        assert eng.budget.waits > 0            # it did hold fetchers back
        assert eng.budget.used == 0 and store.live == 0
    finally:
        eng.close()


def test_one_byte_budget_labels_every_image_one_at_a_time(clf):
    store = SizedStore(24)
    eng = make_engine(clf, store, 1, fetch_threads=16)
    try:
        chunks = [eng.submit(store.uris[i:i + 6]) for i in range(0, 24, 6)]
        recs = [r for c in chunks for r in c.result(120)]
        assert [r.status for r in recs] == ["ok"] * 24
        assert store.max_live == max(len(b) for b in store.blobs.values())   # one body at a time
        assert eng.budget.peak == store.max_live and eng.budget.used == 0
    finally:
        eng.close()


def test_objects_larger_than_the_budget_are_labelled_alone(clf):
    store = SizedStore(12)
    budget = min(len(b) for b in store.blobs.values()) // 2
    eng = make_engine(clf, store, budget)
    try:
        recs = eng.submit(store.uris).result(120)
        assert [r.status for r in recs] == ["ok"] * 12
        assert store.max_live <= max(len(b) for b in store.blobs.values())
        assert eng.budget.used == 0
    finally:
        eng.close()


def test_unknown_size_reserves_the_cap_then_gives_back_the_rest(clf):
    store = SizedStore(8, announce=False)
    cap = 1 << 20
    eng = make_engine(clf, store, 10 * cap, unknown=cap)
    try:
        recs = eng.submit(store.uris).result(120)
        assert [r.status for r in recs] == ["ok"] * 8
        assert all(used >= cap for used, _ in store.used_at_size)   # the cap was reserved
        assert eng.budget.used == 0                                  # and all of it came back
    finally:
        eng.close()


def test_failed_fetches_release_their_reservation(clf):
    store = SizedStore(16)
    uris = store.uris
    store.fail_after_size[uris[1]] = ImageError("broke", ErrorCode.fetch_error)
    store.fail_after_size[uris[2]] = RuntimeError("a bug")
    store.transient_once.add(uris[3])
    budget = 2 * max(len(b) for b in store.blobs.values())
    eng = make_engine(clf, store, budget)
    try:
        recs = eng.submit(uris + uris).result(120)   # twice: the failures' bytes were given back
        codes = {r.uri: (r.error.code if r.error else "ok") for r in recs}
        assert codes[uris[1]] == "fetch_error" and codes[uris[2]] == "internal_error"
        assert codes[uris[3]] == "ok" and store.calls[uris[3]] >= 2
        assert sum(r.status == "ok" for r in recs) == 28
        assert eng.budget.used == 0
    finally:
        eng.close()


def test_a_cancelled_chunk_gives_back_its_bytes_and_stops_waiting(clf):
    store = SizedStore(32)
    store.delay = 0.2
    one = max(len(b) for b in store.blobs.values())
    eng = make_engine(clf, store, one, fetch_threads=16)   # one body at a time: most fetchers wait
    try:
        a = eng.submit(store.uris, name="a")
        assert _until(lambda: eng.budget.waiting() >= 4)
        a.cancel()
        with pytest.raises(Exception, match="cancelled"):
            a.result(10)
        # waiters leave, and bodies already read are given back when their stage drops them
        assert _until(lambda: eng.budget.waiting() == 0 and eng.budget.used == 0, 30), eng.budget.snapshot()
        store.delay = 0.0
        b = eng.submit(store.uris[:8], name="b")
        assert [r.status for r in b.result(60)] == ["ok"] * 8
        assert sum(store.calls.values()) < 32 + 8          # a's waiting images were never fetched
        assert eng.budget.used == 0
    finally:
        eng.close()


def test_the_listing_size_is_reserved_before_the_get(clf):
    store = SizedStore(4)
    sizes = {u: len(b) for u, b in store.blobs.items()}
    seen = []
    real = store.fetch

    def fetch(uri, on_size=None):
        seen.append((store.engine.budget.used, uri))   # before the "GET": only this item's hint
        return real(uri, on_size)

    store.fetch = fetch
    eng = make_engine(clf, store, 10 * 2**20, fetch_threads=1)
    try:
        objs = [SourceObject(u, size=sizes[u] + 7) for u in store.uris]
        recs = eng.submit(objs).result(60)
        assert [r.status for r in recs] == ["ok"] * 4
        # the hint (a few KB) was reserved, not the first estimate (FIRST_ESTIMATE, 1 MiB)
        assert all(sizes[u] + 7 <= used < FIRST_ESTIMATE for used, u in seen), seen
        assert eng.budget.used == 0
    finally:
        eng.close()


# ---------------------------------------------------------------- backends: on_size before the body

class _Sizes:
    def __init__(self, refuse: bool = False):
        self.got: list = []
        self.refuse = refuse

    def __call__(self, n):
        self.got.append(n)
        if self.refuse:
            raise ImageError("no room", ErrorCode.cancelled)


def test_file_announces_its_size_and_a_refusal_stops_the_read(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"x" * 12345)
    pol = FetchPolicy(file_roots=(str(tmp_path),))
    s = _Sizes()
    assert fetch(str(p), pol, on_size=s).size == 12345 and s.got == [12345]
    with pytest.raises(ImageError) as e:
        fetch(str(p), pol, on_size=_Sizes(refuse=True))
    assert e.value.code == ErrorCode.cancelled


class _H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"3e8\r\n" + b"c" * 1000 + b"\r\n0\r\n\r\n")
            return
        self.send_header("Content-Length", "2000")
        self.end_headers()
        self.wfile.write(b"l" * 2000)


@pytest.fixture
def web():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_announces_content_length_or_none(web):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("127.0.0.1",), allow_private_networks=True,
                      timeout_s=5)
    s = _Sizes()
    assert fetch(f"{web}/sized", pol, on_size=s).size == 2000
    assert fetch(f"{web}/chunked", pol, on_size=s).size == 1000
    assert s.got == [2000, None]
    with pytest.raises(ImageError) as e:
        fetch(f"{web}/sized", pol, on_size=_Sizes(refuse=True))
    assert e.value.code == ErrorCode.cancelled


def test_s3_announces_the_object_size(s3, s3_get):
    s3.create_bucket(Bucket="sizes")
    s3.put_object(Bucket="sizes", Key="k.jpg", Body=b"s" * 4321)
    s = _Sizes()
    assert fetch("s3://sizes/k.jpg", s3_get.policy(), on_size=s).size == 4321
    assert s.got == [4321]
    with pytest.raises(ImageError) as e:            # not mapped to another code by the client
        fetch("s3://sizes/k.jpg", s3_get.policy(), on_size=_Sizes(refuse=True))
    assert e.value.code == ErrorCode.cancelled
