"""Real worker subprocesses and CLI runs for integration tests."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HARDNET_BROKER_URL": redis_url,
        "HARDNET_MODEL": "hardnet39ds",       # the fastest variant: these tests are about plumbing
        "HARDNET_WEIGHTS": "random",
        "HARDNET_DEVICE": "cpu",
        "HARDNET_BATCH_SIZE": "16",
        "HARDNET_FETCH_THREADS": "8",
        "HARDNET_VISIBILITY_TIMEOUT": "30",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",               # two workers on two cores
        # test outputs live under the temp dir (pytest's tmp_path); refusal tests override this
        "HARDNET_OUTPUT_ROOTS": tempfile.gettempdir(),
    })
    env.update(extra)
    return env


class Worker:
    def __init__(self, env: dict[str, str], name: str, logdir: Path, args: list[str] | None = None,
                 cmd: list[str] | None = None):
        """`hardnet worker` by default; `cmd` runs another command line (e.g. bare celery)."""
        self.name = name
        self.log_path = logdir / f"worker-{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd or [sys.executable, "-m", "producer.cli", "worker", "--hostname", f"{name}@%h",
                    "--loglevel", "INFO", *(args or [])],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} not in worker {self.name} log after {timeout}s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def cli(args: list[str], env: dict[str, str], timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, input=stdin)


def cli_json(args: list[str], env: dict[str, str], **kw) -> tuple[int, object]:
    p = cli(args, env, **kw)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert lines, f"no output from hardnet {args}: rc={p.returncode}\n{p.stderr[-3000:]}"
    return p.returncode, json.loads(lines[-1])


def wait_state(env: dict[str, str], job: str, states=("done",), timeout: float = 240) -> dict:
    """Wait until the job is in one of ``states``, then return what `hardnet status JOB --json`
    prints. The waiting reads the job's state from Redis in this process (a plain redis:// broker):
    a CLI process every half second costs about 0.7 s of CPU each, taken from the workers on this
    2-core machine; with another broker URL (Sentinel) it polls the CLI."""
    deadline = time.monotonic() + timeout
    st: dict = {}
    url = env.get("HARDNET_BROKER_URL", "")
    if url.startswith("redis://"):
        import redis

        r = redis.Redis.from_url(url, decode_responses=True)
        try:
            while time.monotonic() < deadline:
                if r.hget(f"hnq:job:{{{job}}}", "state") in states:
                    break
                time.sleep(0.2)
        finally:
            r.close()
    while time.monotonic() < deadline:
        _, st = cli_json(["status", job, "--json"], env)
        if st.get("state") in states:
            return st
        time.sleep(0.5)
    _, st = cli_json(["status", job, "--json"], env)
    if st.get("state") in states:
        return st
    raise TimeoutError(f"job {job} still {st.get('state')} after {timeout}s: {st}")


def image_bytes(i: int, fmt: str = "JPEG", size=(64, 48)) -> bytes:
    from PIL import Image

    rnd = random.Random(i)
    img = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    for _ in range(6):  # a few blocks so that images differ beyond their colour
        x, y = rnd.randrange(size[0]), rnd.randrange(size[1])
        img.paste(tuple(rnd.randrange(256) for _ in range(3)), (x, y, min(size[0], x + 12), min(size[1], y + 9)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def bad_images() -> dict[str, bytes]:
    """Broken inputs that must each get one error record without hurting the rest of the chunk."""
    jpeg = image_bytes(10_000)
    return {
        "bad/zero.jpg": b"",
        "bad/random.jpg": bytes(random.Random(1).randrange(256) for _ in range(3000)),
        "bad/html.jpg": b"<html><body><h1>503 Service Unavailable</h1></body></html>",
        "bad/truncated.jpg": jpeg[: len(jpeg) // 2],
    }


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(l) for l in text.splitlines() if l.strip()]
