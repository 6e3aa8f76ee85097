"""Fixtures of the model tests: reference files, generated checkpoints, a loopback HTTP server."""
from __future__ import annotations

import collections
import http.server
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for ``fill``

REPO_ROOT = HERE.parents[1]


@pytest.fixture(scope="session")
def hardnet_fixtures(fixtures_dir) -> Path:
    return fixtures_dir / "hardnet"


@pytest.fixture(scope="session")
def summary(hardnet_fixtures) -> dict:
    return json.loads((hardnet_fixtures / "summary.json").read_text())


@pytest.fixture(autouse=True)
def _private_torch_home(monkeypatch, tmp_path):
    """Every test gets its own empty download cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="session")
def state_dict_39ds() -> dict[str, torch.Tensor]:
    """An untrained but fixed hardnet39ds state_dict (a real checkpoint's layout)."""
    from worker.model import build_hardnet

    torch.manual_seed(1234)
    return build_hardnet("hardnet39ds").state_dict()


@pytest.fixture(scope="session")
def ckpt_39ds(tmp_path_factory, state_dict_39ds) -> Path:
    """``state_dict_39ds`` saved with torch.save, as the official files are."""
    path = tmp_path_factory.mktemp("ckpt") / "hardnet39ds-test.pth"
    torch.save(state_dict_39ds, path)
    return path


class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving in-memory files, counting GETs per path."""

    def __init__(self):
        self.routes: dict[str, dict] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                with server._lock:
                    server.hits[self.path] += 1
                    route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                if route["status"] != 200:
                    self.send_error(route["status"])
                    return
                body = route["body"]
                time.sleep(route["delay"])
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                sent = body if route["truncate_to"] is None else body[: route["truncate_to"]]
                try:
                    self.wfile.write(sent)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, body: bytes = b"", *, status: int = 200, delay: float = 0.0,
            truncate_to: int | None = None) -> str:
        """Serve ``body`` at ``path`` (``truncate_to``: announce the full length, send less)."""
        self.routes[path] = {"body": body, "status": status, "delay": delay, "truncate_to": truncate_to}
        return self.base_url + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    srv = LoopbackServer()
    yield srv
    srv.close()


@pytest.fixture
def dead_url() -> str:
    """An http URL on a loopback port nobody listens on (connection refused at once)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/hardnet39ds-0e6c6fa9.pth"
