"""`hardnet demo`: the whole system on one machine, for a first run. Uses the Redis at
HARDNET_BROKER_URL if one answers there, else starts a throwaway redis-server; starts one worker;
submits the bundled sample images; prints their top-5; stops what it started.

The demo is the one producer command that runs a worker: worker/ (its settings, and the weights,
which load torch) and producer.submit (Celery) are imported inside the command, so that building the
`hardnet` parser, which imports this module, loads neither."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hnq.console import EXIT_OK, EXIT_SOME_FAILED, add_command, print_human
from hnq.fleet import consumers_of
from hnq.jobs.store import JobStore
from hnq.models import DEFAULT_MODEL, MODELS, RANDOM, weights_key
from hnq.schema import ResultRecord
from hnq.settings import CommonSettings, redact_url
from hnq.sources import expand_sources
from producer.progress import wait_for
from producer.settings import ProducerSettings

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


RANDOM_BANNER = "RUNNING WITH RANDOM WEIGHTS: the labels below are meaningless (the plumbing is real)"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except Exception:  # noqa: BLE001
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(workdir: Path) -> tuple[str, int]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed and no Redis answers at HARDNET_BROKER_URL; "
                         "install it (apt-get install -y redis-server) or run scripts/quickstart.sh")
    port = _free_port()
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                    "--save", "", "--appendonly", "no", "--daemonize", "yes",
                    "--pidfile", str(workdir / "redis.pid"), "--logfile", str(workdir / "redis.log")],
                   check=True)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _reachable(url):
            return url, port
        time.sleep(0.1)
    raise SystemExit(f"redis-server did not start (see {workdir / 'redis.log'})")


def _resolve_weights(model: str, weights: str | None) -> str:
    """Official weights if they can be had; otherwise say so plainly and use random ones."""
    if weights:
        return weights
    from worker.model import WeightsError, load_state_dict, resolve_source

    # The loader logs each URL it could not download; the error lists them all, once.
    quiet = logging.getLogger("worker.model.weights")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        load_state_dict(model, resolve_source(model, None), progress=True)
        return "official"
    except WeightsError as e:
        _say(f"could not get the official {model} weights: {e}")
        _say(RANDOM_BANNER)
        return "random"
    finally:
        quiet.setLevel(level)


def run_demo(a) -> int:
    from producer.submit import submit
    from worker.settings import WorkerSettings

    inputs = a.inputs or [str(SAMPLES)]
    roots = [str(Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent) for p in inputs]
    workdir = Path(tempfile.mkdtemp(prefix="hardnet-demo-"))
    started_redis = None
    url = CommonSettings().broker_url
    if _reachable(url):
        _say(f"using the Redis at {redact_url(url)}")
    else:
        url, started_redis = _start_redis(workdir)
        _say(f"started redis-server on 127.0.0.1:{started_redis}")
    asked = a.weights or WorkerSettings().weights
    weights = _resolve_weights(a.model, asked)
    if asked and weights_key(asked) == RANDOM:   # said once (the fallback says it itself); every record is marked too
        _say(RANDOM_BANNER)
    # A queue of its own: the demo's worker never takes a shared queue's chunks (nor a fleet the
    # demo's), even when it uses a Redis that real workers use.
    queue = f"hardnet-demo-{os.getpid()}"
    env = dict(os.environ, HARDNET_BROKER_URL=url, HARDNET_MODEL=a.model, HARDNET_FILE_ROOTS=",".join(roots),
               HARDNET_QUEUE=queue, HARDNET_SWEEP_INTERVAL="0")
    env.pop("HARDNET_WEIGHTS", None)
    if weights != "official":
        env["HARDNET_WEIGHTS"] = weights
    log = open(workdir / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO",
                               "--hostname", f"demo-{os.getpid()}@%h"], env=env, stdout=log, stderr=subprocess.STDOUT)
    _say(f"started a worker (pid {worker.pid}, log {workdir / 'worker.log'}) on queue {queue}")
    try:
        s = ProducerSettings(broker_url=url, queue=queue)
        _say(f"queue {queue} (its own)")
        # Submit once the worker says it is live (its heartbeat, hnq.fleet): submit checks the job
        # against the live workers and would otherwise say that none consumes the demo's queue.
        r = JobStore.from_settings(s).r
        deadline = time.monotonic() + 120
        while not consumers_of(r, queue):
            if worker.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "worker.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the demo's worker did not start (exit {worker.poll()}); its log ends:\n{tail}")
            time.sleep(0.2)
        job = submit(s, expand_sources(inputs), dest=None, model=a.model, chunk_size=4)
        _say(f"submitted job {job.job_id}: {job.total} images in {job.chunks} chunks")
        rc = wait_for(s, job.job_id, timeout=600, follow=False)   # Ctrl-C: the demo stops its worker
        store = JobStore(url)
        for c in range(job.chunks):
            for line in (store.get_part(job.job_id, c) or "").splitlines():
                print_human(ResultRecord.model_validate(json.loads(line)))
        return rc if rc in (EXIT_OK, EXIT_SOME_FAILED) else rc
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        if started_redis:
            subprocess.run(["redis-cli", "-p", str(started_redis), "shutdown", "nosave"], capture_output=True)


def register(sub) -> None:
    d = add_command(sub, "demo", "set up a local Redis + worker and label the bundled samples", run_demo)
    d.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS, help="HarDNet variant")
    d.add_argument("--weights", help="checkpoint or 'random'; unset: official, falling back to random if they "
                   "cannot be downloaded")
    d.add_argument("inputs", nargs="*", help="images or directories; unset: the bundled samples")
