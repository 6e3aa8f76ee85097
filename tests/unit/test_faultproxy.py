"""The fault proxy, and our S3 clients' behaviour through injected faults (8 attempts: boto3's
standard retry mode, obstore's retries): bursts are ridden out, permanent trouble ends in a
TransientError whose code says what it was. GETs run with both clients (``s3_get``)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from faultproxy import FaultProxy, remote_set_fault, remote_stats
from hnq.errors import ConfigError, ErrorCode, ImageError, TransientError
from hnq.storage import FetchPolicy, fetch, open_destination, s3_client

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b"image bytes " * 100


@pytest.fixture
def proxy(s3, moto_server, monkeypatch):
    s3.create_bucket(Bucket="bkt")
    s3.put_object(Bucket="bkt", Key="dir/a b+c%.jpg", Body=BODY)
    with FaultProxy(moto_server.url) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        assert s3_client().meta.endpoint_url == p.url
        yield p


@pytest.fixture
def fast_backoff(monkeypatch):
    """Keep boto's retry count and conditions, shrink its sleeps (throttling backoff starts at 1 s
    and doubles: 8 attempts would sleep up to a minute)."""
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.01)
    try:
        from hnq.storage.s3 import get_obstore as s3_obstore
    except ImportError:
        return
    # the same for obstore (its stores are rebuilt when these change)
    monkeypatch.setattr(s3_obstore, "BACKOFF_INIT", timedelta(milliseconds=5))
    monkeypatch.setattr(s3_obstore, "BACKOFF_MAX", timedelta(milliseconds=10))


URI = "s3://bkt/dir/a b+c%.jpg"


def test_passthrough(proxy, s3):
    assert fetch(URI).data == BODY
    d = open_destination("s3://bkt/out/")
    d.put("j/part-00000.jsonl", b'{"x":1}\n')
    assert d.exists("j/part-00000.jsonl") and not d.exists("j/nope")
    assert d.list("j/") == ["j/part-00000.jsonl"]
    assert s3.get_object(Bucket="bkt", Key="out/j/part-00000.jsonl")["Body"].read() == b'{"x":1}\n'
    st = proxy.stats()
    assert st["requests"] == st["forwarded"] == 5 and st["faults"] == 0
    with pytest.raises(ImageError) as ei:
        fetch("s3://bkt/missing.jpg")
    assert ei.value.code == ErrorCode.not_found


def test_burst_of_503_slowdown_get_real_backoff(proxy, s3_get):
    proxy.set_fault("503", count=3)
    got = fetch(URI, s3_get.policy())
    assert got.data == BODY and got.size == len(BODY) and got.etag
    st = proxy.stats()
    assert st["faults"] == 3 and st["by_mode"] == {"503": 3} and st["requests"] == 4


@pytest.mark.parametrize("mode", ["503", "500", "reset"])
def test_burst_get_and_put(proxy, fast_backoff, mode, s3_get):
    proxy.set_fault(mode, count=3, method="GET")
    assert fetch(URI, s3_get.policy()).data == BODY
    assert proxy.faults_injected == 3
    proxy.reset_stats()
    proxy.set_fault(mode, count=3, method="PUT")
    d = open_destination("s3://bkt/out/")
    d.put("j/x.json", b"{}")
    assert proxy.stats()["faults"] == 3
    proxy.clear()
    assert d.get("j/x.json") == b"{}"


def test_permanent_503_is_transient(proxy, fast_backoff, s3_get):
    proxy.set_fault("503")
    with pytest.raises(TransientError) as ei:
        fetch(URI, s3_get.policy())
    assert ei.value.code == ErrorCode.throttled
    assert "SlowDown" in str(ei.value)
    assert proxy.requests == 8  # HARDNET_S3_MAX_ATTEMPTS default: 8 requests in all
    with pytest.raises(TransientError):
        open_destination("s3://bkt/out/").put("j/x.json", b"{}")
    proxy.reset_stats()
    proxy.set_fault("reset")
    with pytest.raises(TransientError) as ei:
        fetch(URI, s3_get.policy())
    assert ei.value.code == ErrorCode.fetch_error
    assert proxy.requests >= 8  # retried (boto3 per GET, and again for a broken body)


def test_permanent_500_real_backoff_small_attempts(proxy, monkeypatch, s3_get):
    monkeypatch.setenv("HARDNET_S3_MAX_ATTEMPTS", "3")
    proxy.set_fault("500")
    with pytest.raises(TransientError) as ei:
        fetch(URI, s3_get.policy())
    assert ei.value.code == ErrorCode.fetch_error
    assert proxy.requests == 3


def test_access_denied(proxy, s3_get):
    proxy.set_fault("403", count=1)
    with pytest.raises(ImageError) as ei:
        fetch(URI, s3_get.policy())
    assert ei.value.code == ErrorCode.access_denied
    assert proxy.requests == 1  # not retried
    proxy.set_fault("403", count=1)
    with pytest.raises(ConfigError):
        open_destination("s3://bkt/out/").put("j/x.json", b"{}")


def test_truncated_body_retried(proxy, fast_backoff, s3_get):
    proxy.set_fault("truncate", count=2)
    got = fetch(URI, s3_get.policy())
    assert got.data == BODY and got.size == len(BODY)
    assert proxy.faults_injected == 2
    proxy.reset_stats()
    proxy.set_fault("truncate")
    with pytest.raises(TransientError) as ei:
        fetch(URI, s3_get.policy())
    assert ei.value.code == ErrorCode.fetch_error
    assert proxy.faults_injected >= 3  # retried before giving up


def test_slow_and_read_timeout(proxy, monkeypatch, fast_backoff, s3_get):
    monkeypatch.setenv("HARDNET_S3_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("HARDNET_S3_MAX_ATTEMPTS", "2")
    proxy.set_fault("slow", count=1, delay=0.1)
    t0 = time.monotonic()
    assert fetch(URI, s3_get.policy()).data == BODY
    assert time.monotonic() - t0 >= 0.1
    proxy.reset_stats()
    proxy.set_fault("slow", delay=1.0)
    with pytest.raises(TransientError) as ei:
        fetch(URI, s3_get.policy())
    assert ei.value.code == ErrorCode.timeout
    assert proxy.requests == 2  # HARDNET_S3_MAX_ATTEMPTS


def test_duration_and_filters(proxy, fast_backoff):
    proxy.set_fault("500", duration=0.3, path="/nomatch")
    assert fetch(URI).data == BODY
    assert proxy.faults_injected == 0
    proxy.set_fault("500", duration=0.2)
    time.sleep(0.3)
    assert fetch(URI).data == BODY
    assert proxy.faults_injected == 0
    with pytest.raises(ValueError):
        proxy.set_fault("bogus")


def test_head_relayed(proxy):
    d = open_destination("s3://bkt/")
    assert d.exists("dir/a b+c%.jpg")
    proxy.set_fault("503", count=1, method="HEAD")  # a HEAD error has no body: retried all the same
    assert d.exists("dir/a b+c%.jpg")


def test_standalone_process(s3, moto_server, monkeypatch, fast_backoff):
    s3.create_bucket(Bucket="bkt")
    s3.put_object(Bucket="bkt", Key="k.jpg", Body=b"standalone")
    proc = subprocess.Popen([sys.executable, os.path.join(TESTS, "faultproxy.py"),
                             "--upstream", moto_server.url, "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("LISTENING http://127.0.0.1:"), line
        url = line.split()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        assert remote_set_fault(url, "503", count=2, method="GET")["ok"]
        assert fetch("s3://bkt/k.jpg", FetchPolicy()).data == b"standalone"
        st = remote_stats(url)
        assert st["faults"] == 2 and st["requests"] == 3
        remote_set_fault(url, "off")
        assert fetch("s3://bkt/k.jpg").data == b"standalone"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
