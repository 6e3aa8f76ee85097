"""A small fault-injecting HTTP proxy for S3 tests (loopback only).

It listens on 127.0.0.1, forwards every request (method, path, query, headers, body) to an
upstream HTTP server (moto's S3) and relays the answer, unless a fault is armed, in which case it
answers the next requests with that fault instead.

Fault modes:

* ``503``    -- ``503 SlowDown`` with the S3 XML error body
* ``500``    -- ``500 InternalError`` with the S3 XML error body
* ``403``    -- ``403 AccessDenied`` with the S3 XML error body
* ``reset``  -- read the request, then close the socket with a TCP RST (no answer at all)
* ``slow``   -- wait ``delay`` seconds, then forward normally
* ``truncate`` -- forward, answer with the upstream status and headers but only half the body,
  then reset the connection (a body that breaks off mid-stream)
* ``off``    -- disarm

A fault lasts for the next ``count`` matching requests, or for ``duration`` seconds, or (neither
given) until disarmed. ``method`` (e.g. ``PUT``) and ``path`` (a substring of the request path)
restrict which requests it hits.

In a test::

    with FaultProxy(moto_server.url) as proxy:      # or proxy = FaultProxy(url).start()
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.set_fault("503", count=3)
        ...
        proxy.stats()  # {"requests": n, "forwarded": n, "faults": n, "by_mode": {...}}

As a standalone process (e.g. for worker subprocesses)::

    python tests/faultproxy.py --upstream http://127.0.0.1:5000 [--port 0]

prints ``LISTENING http://127.0.0.1:PORT`` on stdout once ready. It is controlled over HTTP on
the same port: ``GET /__fault__?mode=503&count=5`` (also ``duration=``, ``delay=``, ``method=``,
``path=``; ``mode=off`` disarms) and ``GET /__fault__/stats`` (JSON). Control requests are not
counted. :func:`remote_set_fault` and :func:`remote_stats` wrap those calls.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("503", "500", "403", "reset", "slow", "truncate", "off")

_XML = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect", "proxy-authorization", "proxy-authenticate"}


class _Fault:
    def __init__(self, mode: str, count: int | None, duration: float | None, delay: float,
                 method: str | None, path: str | None):
        self.mode = mode
        self.remaining = count
        self.until = time.monotonic() + duration if duration is not None else None
        self.delay = delay
        self.method = method.upper() if method else None
        self.path = path

    def take(self, method: str, path: str) -> bool:
        """Whether this request gets the fault (consumes one of ``count``)."""
        if self.until is not None and time.monotonic() > self.until:
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method and method.upper() != self.method:
            return False
        if self.path and self.path not in path:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


class FaultProxy:
    def __init__(self, upstream: str, port: int = 0, host: str = "127.0.0.1",
                 upstream_timeout: float = 60.0):
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = u.hostname
        self.upstream_port = u.port or 80
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._fault: _Fault | None = None
        self._stats = {"requests": 0, "forwarded": 0, "faults": 0, "by_mode": {}}
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- control
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_fault(self, mode: str, count: int | None = None, duration: float | None = None,
                  delay: float = 1.0, method: str | None = None, path: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {MODES}")
        with self._lock:
            self._fault = None if mode == "off" else _Fault(mode, count, duration, delay, method, path)

    def clear(self) -> None:
        self.set_fault("off")

    def stats(self) -> dict:
        with self._lock:
            return json.loads(json.dumps(self._stats))

    @property
    def requests(self) -> int:
        return self.stats()["requests"]

    @property
    def faults_injected(self) -> int:
        return self.stats()["faults"]

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = {"requests": 0, "forwarded": 0, "faults": 0, "by_mode": {}}

    def _decide(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            self._stats["requests"] += 1
            key = f"{method.upper()} {path}"      # requests per method and path (count GETs of an object)
            self._stats.setdefault("paths", {})[key] = self._stats.get("paths", {}).get(key, 0) + 1
            f = self._fault
            if f is not None and f.take(method, path):
                self._stats["faults"] += 1
                self._stats["by_mode"][f.mode] = self._stats["by_mode"].get(f.mode, 0) + 1
                return f
            self._stats["forwarded"] += 1
            return None

    # --- lifecycle
    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy",
                                        kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _make_handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "faultproxy"

        def log_message(self, *args):  # quiet
            pass

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                out = bytearray()
                while True:
                    size_line = self.rfile.readline()
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _handle(self):
            if self.path.startswith("/__fault__"):
                return self._control()
            body = self._read_body()
            fault = proxy._decide(self.command, self.path)
            if fault is not None:
                if fault.mode == "reset":
                    return self._reset()
                if fault.mode == "slow":
                    time.sleep(fault.delay)
                elif fault.mode == "truncate":
                    return self._forward(body, truncate=True)
                else:
                    return self._s3_error(*_XML[fault.mode])
            self._forward(body)

        def _reset(self):
            """Close with a TCP RST (SO_LINGER 0) instead of answering."""
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

        def _s3_error(self, status: int, code: str, message: str):
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message><RequestId>FAULTPROXY</RequestId></Error>"
                   ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-amz-request-id", "FAULTPROXY")
            if self.command == "HEAD":
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            self.wfile.write(xml)

        def _forward(self, body: bytes, truncate: bool = False):
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers.pop("Content-Length", None)
            if body or self.command in ("PUT", "POST", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                              timeout=proxy.upstream_timeout)
            try:
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read() if self.command != "HEAD" else b""
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() in _HOP_BY_HOP or k.lower() == "content-length":
                        continue
                    self.send_header(k, v)
                if self.command == "HEAD":
                    length = resp.getheader("Content-Length")
                    if length is not None:
                        self.send_header("Content-Length", length)
                elif resp.status not in (204, 304) and not 100 <= resp.status < 200:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if truncate:
                    self.wfile.write(data[: len(data) // 2])
                    return self._reset()
                if data:
                    self.wfile.write(data)
            except OSError as e:  # upstream down (or the client went away)
                msg = f"faultproxy: upstream failed: {e}".encode()
                try:
                    self.send_response(502)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                except OSError:
                    self.close_connection = True
            finally:
                conn.close()

        def _control(self):
            u = urllib.parse.urlsplit(self.path)
            if u.path.rstrip("/") == "/__fault__/stats":
                return self._json(200, proxy.stats())
            q = dict(urllib.parse.parse_qsl(u.query))
            try:
                proxy.set_fault(
                    q.get("mode", "off"),
                    count=int(q["count"]) if "count" in q else None,
                    duration=float(q["duration"]) if "duration" in q else None,
                    delay=float(q.get("delay", 1.0)),
                    method=q.get("method"), path=q.get("path"))
            except (ValueError, KeyError) as e:
                return self._json(400, {"error": str(e)})
            return self._json(200, {"ok": True, **q})

        def _json(self, status: int, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


def remote_set_fault(proxy_url: str, mode: str, **params) -> dict:
    """Arm a fault in a standalone proxy (``params``: count, duration, delay, method, path)."""
    q = urllib.parse.urlencode({"mode": mode, **{k: v for k, v in params.items() if v is not None}})
    with urllib.request.urlopen(f"{proxy_url}/__fault__?{q}", timeout=10) as r:
        return json.loads(r.read())


def remote_stats(proxy_url: str) -> dict:
    with urllib.request.urlopen(f"{proxy_url}/__fault__/stats", timeout=10) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fault-injecting HTTP proxy for S3 tests")
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the real server")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0 = any free one)")
    args = ap.parse_args(argv)
    proxy = FaultProxy(args.upstream, port=args.port)
    print(f"LISTENING {proxy.url}", flush=True)
    try:
        proxy._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        proxy._server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
