"""Broker credentials: a password-protected Redis works end to end, a wrong password is a clear
error, and the password never shows up in output, logs, records or the producer's state."""
from __future__ import annotations

import pytest

from cluster import Worker, base_env, cli, cli_json, image_bytes
from servers import RedisServer

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-Pa55word"


def test_password_protected_redis(tmp_path):
    srv = RedisServer(tmp_path / "redis", password=SECRET).start()
    env = base_env(srv.url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_STATE_DIR=str(tmp_path / "state"))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.jpg").write_bytes(image_bytes(i))
    w = Worker(env, "auth", tmp_path)
    try:
        w.wait_ready()
        rc, summary = cli_json(["submit", str(src), "--out", str(tmp_path / "out"), "--wait", "--json"], env, timeout=180)
        assert rc == 0 and summary["succeeded"] == 6
        wrong = dict(env, HARDNET_BROKER_URL=srv.url.replace(SECRET, "wrong-password"))
        p = cli(["status"], wrong, timeout=120)
        log = w.log()
    finally:
        w.stop()
        srv.stop()
    assert p.returncode == 1 and "cannot use Redis" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "wrong-password" not in p.stderr and ":***@" in p.stderr
    job = summary["job_id"]
    written = [*(tmp_path / "out" / job).iterdir(), *(tmp_path / "state").rglob("*")]
    for f in written:
        if f.is_file():
            assert SECRET not in f.read_text(errors="replace"), f
    assert SECRET not in log, "the worker logged the broker password"


def test_tls_redis_end_to_end(tmp_path):
    """rediss:// with certificate verification: producer, job state and worker all go over TLS."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    srv = RedisServer(tmp_path / "redis", password=SECRET, tls=(cert, key)).start()
    env = base_env(srv.url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_STATE_DIR=str(tmp_path / "state"))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(image_bytes(i))
    w = Worker(env, "tls", tmp_path)
    try:
        w.wait_ready()
        # The server listens with TLS only (--port 0): every connection that works is a TLS one.
        rc, summary = cli_json(["submit", str(src), "--wait", "--json"], env, timeout=180)
        log = w.log()
    finally:
        w.stop()
        srv.stop()
    assert srv.url.startswith("rediss://")
    assert rc == 0 and summary["succeeded"] == 4, summary
    assert SECRET not in log
