"""http(s) fetch policy and SSRF guard, against a local http.server on 127.0.0.1 only.

Tests that need a "public" host map a fake public address to the local server by replacing
``netguard.resolve`` and ``http._open_socket``; nothing ever connects beyond loopback."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import hnq.storage.http as hmod
from hnq.errors import ErrorCode, ImageError, TransientError
from hnq.storage import FetchPolicy, fetch
from hnq.storage import netguard

IMG = b"\x89PNG fake image bytes" * 10
FAKE_PUBLIC = "93.184.216.34"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: C901
        srv = self.server
        srv.hits.append(self.path)
        port = srv.server_address[1]
        p = self.path
        if p.startswith("/img.png"):
            return self._send(200, IMG, [("ETag", '"abc123"'), ("Content-Type", "image/png")])
        if p == "/empty.png":
            return self._send(200, b"")
        if p == "/big":
            return self._send(200, b"y" * 5000)
        if p == "/chunked-big":  # no Content-Length: only the streaming cap can stop it
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"1000\r\n" + b"z" * 4096 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            return
        if p == "/lying-length":  # announces a small size, sends more
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"w" * 10)
            return
        if p == "/404":
            return self._send(404, b"nope")
        if p == "/403":
            return self._send(403, b"denied")
        if p == "/503":
            return self._send(503, b"busy")
        if p == "/429":
            return self._send(429, b"too many")
        if p == "/500":
            return self._send(500, b"oops")
        if p == "/418":
            return self._send(418, b"teapot")
        if p == "/flaky":
            srv.flaky += 1
            if srv.flaky <= 2:
                return self._send(503, b"busy")
            return self._send(200, IMG)
        if p == "/slow":
            time.sleep(1.5)
            return self._send(200, IMG)
        if p == "/redirect-same":
            return self._send(302, headers=[("Location", "/img.png?via=redirect")])
        if p == "/redirect-loopback":
            return self._send(302, headers=[("Location", f"http://127.0.0.1:{port}/img.png")])
        if p == "/redirect-metadata":
            return self._send(301, headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        if p == "/redirect-other-host":
            return self._send(307, headers=[("Location", f"http://evil.test:{port}/img.png")])
        if p == "/redirect-file":
            return self._send(302, headers=[("Location", "file:///etc/passwd")])
        if p == "/redirect-loop":
            return self._send(302, headers=[("Location", "/redirect-loop")])
        return self._send(404)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients hang up on purpose (size caps)
        pass


@pytest.fixture
def web():
    srv = _QuietServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.hits = []
    srv.flaky = 0
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def local_policy(**kw) -> FetchPolicy:
    kw.setdefault("allow_http", True)
    kw.setdefault("http_allow_hosts", ("127.0.0.1",))
    kw.setdefault("allow_private_networks", True)
    kw.setdefault("timeout_s", 5.0)
    return FetchPolicy(**kw)


@pytest.fixture
def no_connect(monkeypatch):
    """Fail the test if anything tries to open a socket through the fetcher."""
    attempts = []

    def refuse(addresses, port, timeout):
        attempts.append((addresses, port))
        raise AssertionError(f"connection attempted to {addresses}:{port}")

    monkeypatch.setattr(hmod, "_open_socket", refuse)
    return attempts


@pytest.fixture
def fake_public(monkeypatch, web):
    """``origin.test`` resolves to a public-looking address that is wired to the local server."""
    real_resolve = netguard.resolve
    real_open = hmod._open_socket
    port = web.server_address[1]

    def resolve(host, p, timeout=None):
        if host in ("origin.test", "evil.test"):
            return [FAKE_PUBLIC]
        if host == "rebind.test":
            return [FAKE_PUBLIC, "10.1.2.3"]
        return real_resolve(host, p, timeout)

    def open_socket(addresses, p, timeout):
        if addresses == [FAKE_PUBLIC]:
            return real_open(["127.0.0.1"], port, timeout)
        assert all(a.startswith("127.") for a in addresses), addresses
        return real_open(addresses, p, timeout)

    monkeypatch.setattr(netguard, "resolve", resolve)
    monkeypatch.setattr(hmod, "_open_socket", open_socket)
    return f"http://origin.test:{port}"


# ---------------------------------------------------------------- policy gates

def test_refused_by_default(web):
    with pytest.raises(ImageError) as ei:
        fetch(web.base + "/img.png", FetchPolicy())
    assert ei.value.code == ErrorCode.unsupported_scheme
    assert "HARDNET_ALLOW_HTTP" in str(ei.value) and "HARDNET_HTTP_ALLOW_HOSTS" in str(ei.value)
    assert web.hits == []


def test_refused_when_no_host_allowed(web):
    with pytest.raises(ImageError) as ei:
        fetch(web.base + "/img.png", FetchPolicy(allow_http=True))
    assert ei.value.code == ErrorCode.forbidden
    assert "HARDNET_HTTP_ALLOW_HOSTS" in str(ei.value)
    assert web.hits == []


def test_refused_host_not_allowlisted(web):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("images.example.com", "*.cdn.example"),
                      allow_private_networks=True)
    with pytest.raises(ImageError) as ei:
        fetch(web.base + "/img.png", pol)
    assert ei.value.code == ErrorCode.forbidden
    assert web.hits == []


def test_refused_loopback_when_private_not_allowed(web):
    """SSRF: an allowlisted host that resolves to loopback is still refused."""
    for host in ("127.0.0.1", "localhost"):
        pol = FetchPolicy(allow_http=True, http_allow_hosts=(host,))
        url = web.base.replace("127.0.0.1", host) + "/img.png"
        with pytest.raises(ImageError) as ei:
            fetch(url, pol)
        assert ei.value.code == ErrorCode.forbidden, host
        assert "private" in str(ei.value) or "loopback" in str(ei.value)
    assert web.hits == []


def test_allowed_with_private_networks(web):
    f = fetch(web.base + "/img.png", local_policy())
    assert f.data == IMG and f.size == len(IMG) and f.etag == "abc123"
    assert fetch(web.base + "/empty.png", local_policy()).data == b""


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00::1]/x.jpg", "http://10.0.0.8/x.jpg", "http://192.168.1.1/x.jpg",
    "http://0.0.0.0/x.jpg", "http://[::1]/x.jpg", "http://2130706433/x.jpg",
    "http://[::ffff:127.0.0.1]/x.jpg", "http://100.64.0.1/x.jpg", "http://224.0.0.1/x.jpg",
    "http://[fe80::1]/x.jpg", "http://172.16.5.4/x.jpg",
])
def test_private_addresses_refused_before_connecting(url, no_connect):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("*",))
    with pytest.raises(ImageError) as ei:
        fetch(url, pol)
    assert ei.value.code == ErrorCode.forbidden
    assert no_connect == []


def test_every_resolved_address_checked(fake_public, no_connect):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("rebind.test",))
    with pytest.raises(ImageError) as ei:
        fetch("http://rebind.test/x.jpg", pol)
    assert ei.value.code == ErrorCode.forbidden and "10.1.2.3" in str(ei.value)
    assert no_connect == []


def test_public_host_fetched(fake_public, web):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("origin.test",))
    assert fetch(fake_public + "/img.png", pol).data == IMG
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("*.test",))
    assert fetch(fake_public + "/img.png", pol).data == IMG


# ---------------------------------------------------------------- redirects

def test_redirect_followed(web):
    assert fetch(web.base + "/redirect-same", local_policy()).data == IMG
    assert web.hits == ["/redirect-same", "/img.png?via=redirect"]


def test_redirect_to_loopback_refused(fake_public, web):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("origin.test", "127.0.0.1"))
    with pytest.raises(ImageError) as ei:
        fetch(fake_public + "/redirect-loopback", pol)
    assert ei.value.code == ErrorCode.forbidden
    assert web.hits == ["/redirect-loopback"]  # the first hop was allowed, the second never made


def test_redirect_to_metadata_refused(fake_public, web):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("*",))
    with pytest.raises(ImageError) as ei:
        fetch(fake_public + "/redirect-metadata", pol)
    assert ei.value.code == ErrorCode.forbidden


def test_redirect_to_unlisted_host_or_scheme_refused(fake_public, web):
    pol = FetchPolicy(allow_http=True, http_allow_hosts=("origin.test",))
    for path in ("/redirect-other-host", "/redirect-file"):
        with pytest.raises(ImageError) as ei:
            fetch(fake_public + path, pol)
        assert ei.value.code == ErrorCode.forbidden, path


def test_redirect_loop(web):
    with pytest.raises(ImageError) as ei:
        fetch(web.base + "/redirect-loop", local_policy())
    assert ei.value.code == ErrorCode.fetch_error
    assert len(web.hits) == hmod.MAX_REDIRECTS + 1


# ---------------------------------------------------------------- sizes, statuses, timeouts

def test_size_cap(web):
    with pytest.raises(ImageError) as ei:
        fetch(web.base + "/big", local_policy(max_bytes=4999))
    assert ei.value.code == ErrorCode.too_large
    assert fetch(web.base + "/big", local_policy(max_bytes=5000)).size == 5000
    with pytest.raises(ImageError) as ei:
        fetch(web.base + "/chunked-big", local_policy(max_bytes=10_000))
    assert ei.value.code == ErrorCode.too_large


def test_size_cap_reads_at_most_max_plus_one(web, monkeypatch):
    read_sizes = []
    real = hmod.read_capped

    def spy(read, max_bytes, uri, **kw):
        def counting(n):
            data = read(n)
            read_sizes.append(len(data))
            return data
        return real(counting, max_bytes, uri, **kw)

    monkeypatch.setattr(hmod, "read_capped", spy)
    with pytest.raises(ImageError):
        fetch(web.base + "/chunked-big", local_policy(max_bytes=10_000))
    assert sum(read_sizes) == 10_001


@pytest.mark.parametrize("path,code", [("/404", ErrorCode.not_found),
                                       ("/403", ErrorCode.access_denied),
                                       ("/418", ErrorCode.fetch_error)])
def test_status_mapping(web, path, code):
    with pytest.raises(ImageError) as ei:
        fetch(web.base + path, local_policy())
    assert ei.value.code == code


@pytest.mark.parametrize("path,code", [("/503", ErrorCode.throttled), ("/429", ErrorCode.throttled),
                                       ("/500", ErrorCode.fetch_error)])
def test_5xx_retried_then_transient(web, path, code):
    with pytest.raises(TransientError) as ei:
        fetch(web.base + path, local_policy())
    assert ei.value.code == code
    assert web.hits.count(path) == hmod.ATTEMPTS
    assert fetch(web.base + "/flaky", local_policy()).data == IMG


def test_connection_refused_is_transient():
    from servers import free_port

    with pytest.raises(TransientError) as ei:
        fetch(f"http://127.0.0.1:{free_port()}/x.jpg", local_policy())
    assert ei.value.code == ErrorCode.fetch_error


def test_timeout(web):
    t0 = time.monotonic()
    with pytest.raises(ImageError) as ei:
        fetch(web.base + "/slow", local_policy(timeout_s=0.4))
    assert ei.value.code == ErrorCode.timeout
    assert time.monotonic() - t0 < 1.4


# ---------------------------------------------------------------- netguard helpers

def test_host_allowlist_matching():
    allow = ("images.example.com", "*.cdn.example", "10.0.0.1", "[::1]")
    assert netguard.host_allowed("images.example.com", allow)
    assert netguard.host_allowed("IMAGES.example.com.", allow)
    assert netguard.host_allowed("a.cdn.example", allow)
    assert netguard.host_allowed("a.b.cdn.example", allow)
    assert not netguard.host_allowed("cdn.example", allow)
    assert not netguard.host_allowed("evilcdn.example", allow)
    assert not netguard.host_allowed("images.example.com.evil.org", allow)
    assert netguard.host_allowed("10.0.0.1", allow)
    assert netguard.host_allowed("::1", allow)
    assert not netguard.host_allowed("anything", ())
    assert netguard.host_allowed("anything", ("*",))


@pytest.mark.parametrize("addr,public", [
    ("8.8.8.8", True), ("93.184.216.34", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("127.8.9.1", False), ("10.1.1.1", False), ("172.31.0.1", False),
    ("192.168.0.1", False), ("169.254.169.254", False), ("0.0.0.0", False), ("100.64.1.1", False),
    ("224.0.0.251", False), ("255.255.255.255", False), ("::1", False), ("::", False),
    ("fe80::1", False), ("fd12::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True), ("64:ff9b::a9fe:a9fe", False),
    ("2002:7f00:1::1", False), ("fec0::1", False), ("fe80::1%eth0", False),
])
def test_is_public_address(addr, public):
    assert netguard.is_public_address(addr) is public
