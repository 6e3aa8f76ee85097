"""Real throwaway servers for tests: a redis-server on a free port and moto's S3 server on
127.0.0.1. Nothing here reaches beyond loopback."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A redis-server process we own. ``persist=True`` turns on AOF so a restart keeps the data."""

    def __init__(self, workdir: Path, port: int | None = None, persist: bool = False,
                 password: str | None = None, tls: tuple[Path, Path] | None = None):
        """``tls=(cert, key)``: TLS only (the cert is also the CA), clients need no certificate."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it with apt-get)")
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.pidfile = self.workdir / f"redis-{self.port}.pid"
        self.password = password
        self.tls = tls

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return (f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required"
                    f"&ssl_ca_certs={self.tls[0]}")
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _cli(self) -> list[str]:
        tls = ["--tls", "--cacert", str(self.tls[0])] if self.tls else []
        return (["redis-cli", "-h", "127.0.0.1", "-p", str(self.port)] + tls
                + (["--no-auth-warning", "-a", self.password] if self.password else []))

    def start(self) -> "RedisServer":
        port_args = (["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls[0]),
                      "--tls-key-file", str(self.tls[1]), "--tls-ca-cert-file", str(self.tls[0]),
                      "--tls-auth-clients", "no"] if self.tls else ["--port", str(self.port)])
        args = ["redis-server", *port_args, "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--daemonize", "yes", "--pidfile", str(self.pidfile),
                "--logfile", str(self.workdir / f"redis-{self.port}.log")]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:
            args += ["--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        subprocess.run(args, check=True)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        subprocess.run(self._cli() + (["shutdown"] if self.persist else ["shutdown", "nosave"]),
                       capture_output=True, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    time.sleep(0.05)
            except OSError:
                return

    def flush(self) -> None:
        subprocess.run(self._cli() + ["flushall"], capture_output=True, check=True)


class MotoS3:
    """moto's S3 in server mode on 127.0.0.1 (a real HTTP endpoint, as boto3 sees it)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def start(self) -> "MotoS3":
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.port = port
        self.url = f"http://{host}:{port}"
        return self

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        self._server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto3 (ours and the workers') at the loopback S3 server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # never read the developer's real credentials or config
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class LoopbackWeb:
    """A real HTTP server on 127.0.0.1 for http(s):// sources: ``respond(path)`` gives
    ``(status, body)`` for each GET (it may block, to hold a request), and ``hits`` lists the paths
    asked for. JPEG content type on 200."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hits.append(self.path)
                status, body = respond(self.path)
                if status != 200:
                    self.send_error(status)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.hits = hits
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def without_proxies(env: dict[str, str]) -> dict[str, str]:
    """``env`` without proxy variables (boto3 and urllib honour them): everything in the tests
    stays on 127.0.0.1."""
    for var in PROXY_VARS:
        env.pop(var, None)
    return env
