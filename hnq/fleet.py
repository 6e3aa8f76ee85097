"""What the live workers accept, and the check of a job against it at submit.

Each worker process publishes its capabilities (:class:`WorkerCaps`: the queues it consumes, the
local folders it may read — ``HARDNET_FILE_ROOTS`` — and write — ``HARDNET_OUTPUT_ROOTS`` —, the
buckets it may write and read, whether it fetches ``http(s)://``, which checkpoints a job may name,
its model, weights, host, pid and version) in a heartbeat key, ``hnq:worker:HOSTNAME:PID``, that
expires :data:`TTL_S` after its last refresh (every :data:`INTERVAL_S`, by a daemon thread started
when the worker is ready; deleted when it stops). Torch-free: `hardnet submit` reads these keys
(one SCAN and one MGET) and refuses at once, exit 2, a job that no live worker of its queue can
run, naming the setting to change (:func:`check_job`); with no live worker at all it lets the job
wait for one. The workers still check every chunk themselves (records ``forbidden``, dead letters):
this check only moves the refusal to submit, before anything exists.

:func:`check_job_weights` — which checkpoints a job may name on a worker — lives here so that the
worker (``worker.engine_pool``) and the check at submit read the one rule.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Iterable

from hnq.errors import ConfigError
from hnq.logs import redact_uri
from hnq.models import WEIGHTS_WORDS, weights_key
from hnq.storage.file import within_roots
from hnq.uris import InvalidURI, file_uri_to_path, parse_s3, scheme_of

log = logging.getLogger("hardnet.fleet")

PREFIX = "hnq:worker:"
#: seconds between two refreshes of a worker's heartbeat
INTERVAL_S = 5.0
#: seconds a heartbeat lives without a refresh (a killed worker counts as live that long)
TTL_S = 20


def package_version() -> str:
    try:
        return version("hardnet-queue")
    except PackageNotFoundError:
        return "unknown"


def _sha(value: str | None) -> str | None:
    return hashlib.sha256(weights_key(value).encode()).hexdigest() if value is not None else None


# --------------------------------------------------------------------------------- capabilities
@dataclass
class WorkerCaps:
    """What one worker process accepts. ``None`` for a bucket list = any bucket; ``[]`` roots = no
    local files."""

    hostname: str
    pid: int
    queues: list[str]
    model: str
    weights: str                               # for display: official, random, or the redacted path/URL
    weights_sha256: str | None = None          # sha256 of the exact HARDNET_WEIGHTS (a URL may hold a signature)
    file_roots: list[str] = field(default_factory=list)
    output_roots: list[str] = field(default_factory=list)
    output_buckets: list[str] | None = None
    source_buckets: list[str] | None = None
    allow_http: bool = False
    job_weights_allow: list[str] | None = None
    version: str = ""
    at: float = 0.0

    @classmethod
    def of(cls, settings, *, hostname: str, pid: int | None = None, queues: list[str] | None = None) -> "WorkerCaps":
        """From a worker's settings (``worker.settings.WorkerSettings``, read by attribute)."""
        s = settings

        def lst(v):
            return list(v) if v is not None else None
        return cls(hostname=hostname, pid=pid or os.getpid(), queues=list(queues or [s.queue]),
                   model=s.model, weights=redact_uri(s.weights) if s.weights else "official",
                   weights_sha256=_sha(s.weights), file_roots=list(s.file_roots or []),
                   output_roots=list(s.output_roots or []), output_buckets=lst(s.output_buckets),
                   source_buckets=lst(s.source_buckets), allow_http=bool(s.allow_http),
                   job_weights_allow=lst(s.job_weights_allow), version=package_version(), at=time.time())

    def key(self) -> str:
        return f"{PREFIX}{self.hostname}:{self.pid}"

    def line(self) -> str:
        """What it accepts, in one line (the worker's ready line; a refusal at submit)."""
        files = (f"reads local files under {', '.join(self.file_roots)}" if self.file_roots
                 else "refuses local files (HARDNET_FILE_ROOTS unset)")
        out = (f"writes under {', '.join(self.output_roots)}" if self.output_roots
               else "writes no local folder (HARDNET_OUTPUT_ROOTS unset)")
        out += (", to any S3 bucket" if self.output_buckets is None
                else f", to S3 buckets {', '.join(self.output_buckets) or 'none'}")
        s3 = ("reads any S3 bucket" if self.source_buckets is None
              else f"reads S3 buckets {', '.join(self.source_buckets) or 'none'}")
        http = "http(s) on" if self.allow_http else "http(s) off"
        return f"{files}; {out}; {s3}; {http}"


def _queues_of(consumer) -> list[str] | None:
    try:
        return sorted(q.name for q in consumer.task_consumer.queues) or None
    except Exception:  # noqa: BLE001 - not a Celery consumer as expected: the settings' queue
        return None


class Heartbeat:
    """A worker's published capabilities, refreshed by a daemon thread until :meth:`stop`."""

    def __init__(self, r, caps: WorkerCaps, interval_s: float = INTERVAL_S, ttl_s: int = TTL_S):
        self.r, self.caps, self.interval, self.ttl = r, caps, interval_s, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_consumer(cls, r, settings, consumer) -> "Heartbeat":
        hostname = str(getattr(consumer, "hostname", "") or os.uname().nodename)
        return cls(r, WorkerCaps.of(settings, hostname=hostname, queues=_queues_of(consumer)))

    def beat(self) -> None:
        self.caps.at = time.time()
        self.r.set(self.caps.key(), json.dumps(asdict(self.caps)), ex=self.ttl)

    def start(self) -> "Heartbeat":
        """The first beat now (a submit right after the ready line sees this worker), then a
        daemon thread; a failed beat is logged and tried again at the next interval."""
        try:
            self.beat()
        except Exception as e:  # noqa: BLE001 - Redis away: the thread tries again
            log.warning("could not publish this worker's heartbeat: %s", e)
        self._thread = threading.Thread(target=self._run, name="hardnet-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001
                log.warning("could not refresh this worker's heartbeat: %s", e)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.r.delete(self.caps.key())
        except Exception:  # noqa: BLE001 - it expires by itself
            pass


def live_workers(r) -> list[WorkerCaps]:
    """Every worker whose heartbeat has not expired (one SCAN, one MGET)."""
    keys = list(r.scan_iter(match=PREFIX + "*", count=1000))
    if not keys:
        return []
    out = []
    names = set(WorkerCaps.__dataclass_fields__)
    for raw in r.mget(keys):
        if raw is None:
            continue
        try:
            d = json.loads(raw)
            out.append(WorkerCaps(**{k: v for k, v in d.items() if k in names}))
        except (ValueError, TypeError):
            continue
    return out


def consumers_of(r, queue: str) -> list[WorkerCaps]:
    """The live workers that consume ``queue`` (their heartbeats)."""
    return [w for w in live_workers(r) if queue in w.queues]


# --------------------------------------------------------------------------------- weights rule
def check_job_weights(weights: str | None, allow: tuple[str, ...] | list[str] | None, own: str | None) -> None:
    """ConfigError unless a worker may load ``weights`` for a job: 'official' and 'random' always;
    the worker's own ``HARDNET_WEIGHTS``; else a path or URL under one of ``allow``
    (``HARDNET_JOB_WEIGHTS_ALLOW``: directories and URL prefixes)."""
    key = weights_key(weights)
    if key in WEIGHTS_WORDS:
        return
    if own is not None and key == weights_key(own):
        return
    if not allow:
        raise ConfigError(f"the job asks for weights {key!r}, but this worker loads no job-named "
                          "checkpoints (set HARDNET_JOB_WEIGHTS_ALLOW to the directories or URL "
                          "prefixes they may come from)")
    low = key.lower()
    if low.startswith(("http://", "https://")):
        for a in allow:
            a = a.lower()
            if "://" not in a or a.startswith("file://"):
                continue
            # a prefix ends at a "/": https://models.example never admits https://models.example.evil/
            if low.startswith(a if a.endswith("/") else a + "/"):
                return
    else:
        path = key[len("file://"):] if low.startswith("file://") else key
        real = os.path.realpath(path)
        for a in allow:
            if "://" in a and not a.lower().startswith("file://"):
                continue
            root = os.path.realpath(a[len("file://"):] if a.lower().startswith("file://") else a)
            if real == root or real.startswith(root.rstrip("/") + "/"):
                return
    raise ConfigError(f"the job asks for weights {key!r}, which is not under this worker's "
                      f"HARDNET_JOB_WEIGHTS_ALLOW ({', '.join(allow)})")


# --------------------------------------------------------------------------------- the check
@dataclass
class JobNeeds:
    """What a job asks of a worker: local paths to read, S3 buckets to read, http(s), where to
    write (a normalised destination or None = Redis) and job-named weights."""

    local: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)
    http: bool = False
    dest: str | None = None
    weights: str | None = None

    @classmethod
    def of(cls, sources: Iterable[str], *, dest: str | None, weights: str | None) -> "JobNeeds":
        """``sources``: SOURCE arguments and URIs (``@file`` and ``inventory:`` entries ignored:
        their URIs come as the first of the stream)."""
        n = cls(dest=dest, weights=weights)
        for src in sources:
            if not src or src.startswith(("@", "inventory:")):
                continue
            scheme = scheme_of(src)
            try:
                if scheme == "file":
                    p = os.path.abspath(os.path.expanduser(file_uri_to_path(src)))
                    if p not in n.local:
                        n.local.append(p)
                elif scheme == "s3":
                    b = parse_s3(src, require_key=False)[0]
                    if b not in n.buckets:
                        n.buckets.append(b)
                elif scheme in ("http", "https"):
                    n.http = True
            except (InvalidURI, ValueError):
                continue        # a malformed URI gets its own record from the worker
        return n


@dataclass
class Refusal:
    setting: str       # the variable to change
    what: str          # "read /data/photos"
    value: str         # what to add to it


def _dir_of(p: str) -> str:
    return p if os.path.isdir(p) or p.endswith("/") else (os.path.dirname(p) or p)


def refusals(caps: WorkerCaps, needs: JobNeeds) -> list[Refusal]:
    """What ``caps`` refuses of ``needs`` (empty: the worker can run the job)."""
    out: list[Refusal] = []
    for p in needs.local:
        if not caps.file_roots or within_roots(p, tuple(caps.file_roots)) is None:
            out.append(Refusal("HARDNET_FILE_ROOTS", f"read {p}", _dir_of(p).rstrip("/") or "/"))
    for b in needs.buckets:
        if caps.source_buckets is not None and b not in caps.source_buckets:
            out.append(Refusal("HARDNET_SOURCE_BUCKETS", f"read s3://{b}/", b))
    if needs.http and not caps.allow_http:
        out.append(Refusal("HARDNET_ALLOW_HTTP", "fetch http(s):// URLs", "true"))
    d = needs.dest
    if d and d.startswith("s3://"):
        b = d[5:].split("/", 1)[0]
        if caps.output_buckets is not None and b not in caps.output_buckets:
            out.append(Refusal("HARDNET_OUTPUT_BUCKETS", f"write {d}", b))
    elif d:
        try:
            path = file_uri_to_path(d)
        except InvalidURI:
            path = d
        if not caps.output_roots or within_roots(path, tuple(caps.output_roots)) is None:
            out.append(Refusal("HARDNET_OUTPUT_ROOTS", f"write {path}", path.rstrip("/") or "/"))
    if needs.weights is not None and weights_key(needs.weights) not in WEIGHTS_WORDS:
        own = _sha(needs.weights) == caps.weights_sha256
        if not own:
            try:
                check_job_weights(needs.weights, caps.job_weights_allow, None)
            except ConfigError:
                w = redact_uri(needs.weights)
                out.append(Refusal("HARDNET_JOB_WEIGHTS_ALLOW", f"load the weights {w}", _dir_of(w)))
    return out


def _fix(caps: WorkerCaps, found: list[Refusal]) -> str:
    """``HARDNET_X=old,new`` for each setting refused, the worker's present values kept."""
    now = {"HARDNET_FILE_ROOTS": caps.file_roots, "HARDNET_OUTPUT_ROOTS": caps.output_roots,
           "HARDNET_SOURCE_BUCKETS": caps.source_buckets or [], "HARDNET_OUTPUT_BUCKETS": caps.output_buckets or [],
           "HARDNET_JOB_WEIGHTS_ALLOW": caps.job_weights_allow or [], "HARDNET_ALLOW_HTTP": []}
    values: dict[str, list[str]] = {}
    for f in found:
        vals = values.setdefault(f.setting, list(now[f.setting]))
        if f.value not in vals:
            vals.append(f.value)
    return " ".join(f"{k}={','.join(v)}" for k, v in values.items())


def check_job(r, queue: str, needs: JobNeeds) -> str | None:
    """Raise ConfigError (exit 2) when live workers consume ``queue`` and none of them can run the
    job: one line, every refusal (inputs and outputs) of the worker closest to it, the settings to
    start one with, and what the live workers accept now. Returns a note for the user when no
    worker of ``queue`` is live (the job waits for one), else None."""
    workers = live_workers(r)
    mine = [w for w in workers if queue in w.queues]     # consumers_of, with the others kept for the note
    if not mine:
        others = sorted({q for w in workers for q in w.queues})
        return (f"no live worker consumes queue {queue!r} now"
                + (f" (live workers consume {', '.join(others)})" if others else "")
                + ": the job waits until one starts (hardnet worker)")
    found = [(refusals(w, needs), w) for w in mine]
    if any(not f for f, _ in found):
        return None
    best, caps = min(found, key=lambda x: len(x[0]))
    whats = ", nor ".join(f.what for f in best)
    accept = sorted({w.line() for w in mine})
    more = f" (+{len(accept) - 2} other kinds)" if len(accept) > 2 else ""
    raise ConfigError(
        f"no live worker may {whats}: start one with {_fix(caps, best)} "
        f"({len(mine)} live on queue {queue!r}; workers now accept: {' | '.join(accept[:2])}{more})")


__all__ = ["PREFIX", "INTERVAL_S", "TTL_S", "WorkerCaps", "Heartbeat", "live_workers", "consumers_of",
           "check_job_weights",
           "JobNeeds", "Refusal", "refusals", "check_job", "package_version"]
