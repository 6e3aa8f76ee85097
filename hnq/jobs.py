"""Job state in Redis: counters and pointers only, never the results themselves (those go to DEST).

Every update is idempotent, because at-least-once delivery means a chunk can finish twice (a
redelivered chunk, or two workers racing past the visibility timeout): per-chunk outcomes live in a
hash, and the job's counters are adjusted by the difference, atomically, in Lua.

Keys (all under ``hnq:``, expiring ``results_ttl_days`` after the last write):
  hnq:jobs                    ZSET job id -> submit time (for `hardnet status` without a job)
  hnq:job:ID                  HASH model, dest, state, total, chunks, sealed, succeeded, failed, …
  hnq:job:ID:done             HASH chunk -> "ok failed"
  hnq:job:ID:attempts         HASH chunk -> deliveries so far
  hnq:job:ID:lasterr          HASH chunk -> last error message
  hnq:job:ID:dead             HASH chunk -> dead letter (JSON: uris, error, attempts, at)
  hnq:job:ID:part:N           STRING the chunk's JSONL records when DEST is Redis
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from hnq.schema import JobInfo

PREFIX = "hnq"

# KEYS: job, done, dead ; ARGV: chunk, ok, failed, now, ttl
_COMPLETE = """
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then
  local pok, pf = string.match(prev, '(%d+) (%d+)')
  redis.call('HINCRBY', KEYS[1], 'succeeded', 0 - tonumber(pok))
  redis.call('HINCRBY', KEYS[1], 'failed', 0 - tonumber(pf))
else
  redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('HINCRBY', KEYS[1], 'succeeded', tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'failed', tonumber(ARGV[3]))
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'dead_chunks', -1)
end
for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ARGV[5]) end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' then return 0 end
if redis.call('HGET', KEYS[1], 'sealed') == '1' and
   tonumber(redis.call('HGET', KEYS[1], 'chunks_done')) >= tonumber(redis.call('HGET', KEYS[1], 'chunks')) then
  return 1
end
return 0
"""

# KEYS: job ; ARGV: total, chunks
_SEAL = """
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'chunks', ARGV[2], 'sealed', '1')
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'chunks_done') or '0') >= tonumber(ARGV[2]) then return 1 end
return 0
"""

# KEYS: job ; ARGV: now.  Returns the state the chunk should act on.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
end
return state
"""


class _Retry(Retry):
    """Backoff on connection trouble, but a wrong password is not trouble that passes."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(e: Exception) -> bool:
            if isinstance(e, redis.AuthenticationError):
                return False
            return is_retryable(e) if is_retryable else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:8]


def _iso(ts: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(ts), timezone.utc) if ts else None


@dataclass
class DeadLetter:
    job_id: str
    chunk: int
    uris: list[str]
    error: str
    attempts: int
    at: float


class JobStore:
    """Job state for one Redis. Both sides use it; it holds one connection pool."""

    def __init__(self, url: str, ttl_days: int = 14, client: redis.Redis | None = None):
        self.r = client or redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=30, socket_connect_timeout=10,
            health_check_interval=10,
            # Ride out a Redis restart (about two minutes of backoff) instead of dying.
            retry=_Retry(ExponentialBackoff(cap=10, base=0.2), 25),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.ttl = ttl_days * 86400
        self._complete = self.r.register_script(_COMPLETE)
        self._seal = self.r.register_script(_SEAL)
        self._start = self.r.register_script(_START)

    # -- keys --
    @staticmethod
    def key(job_id: str, *parts: str) -> str:
        return ":".join((PREFIX, "job", job_id) + parts)

    # -- producer side --
    def create(self, job_id: str, *, model: str, dest: str | None, weights: str | None = None) -> None:
        k = self.key(job_id)
        now = time.time()
        with self.r.pipeline() as p:
            p.hset(k, mapping={"model": model, "dest": dest or "", "state": "queued",
                               "submitted_at": now, "sealed": 0, "chunks_done": 0,
                               "succeeded": 0, "failed": 0, "dead_chunks": 0,
                               "weights": weights or ""})
            p.expire(k, self.ttl)
            p.zadd(f"{PREFIX}:jobs", {job_id: now})
            p.execute()

    def seal(self, job_id: str, total: int, chunks: int) -> bool:
        """Listing finished: record the totals. True if every chunk already finished (the caller
        must then have the job finalised, since no worker will see a last chunk any more)."""
        return bool(self._seal(keys=[self.key(job_id)], args=[total, chunks]))

    def cancel(self, job_id: str) -> bool:
        k = self.key(job_id)
        if not self.r.exists(k):
            return False
        self.r.hset(k, mapping={"state": "cancelled", "finished_at": time.time()})
        return True

    def recent(self, n: int = 20) -> list[str]:
        return list(self.r.zrevrange(f"{PREFIX}:jobs", 0, n - 1))

    def info(self, job_id: str) -> JobInfo | None:
        h = self.r.hgetall(self.key(job_id))
        if not h:
            return None
        done = int(h.get("succeeded", 0)) + int(h.get("failed", 0))
        started = float(h["started_at"]) if h.get("started_at") else None
        end = float(h["finished_at"]) if h.get("finished_at") else time.time()
        rate = done / (end - started) if started and end > started and done else None
        total = int(h["total"]) if h.get("total") else None
        eta = (total - done) / rate if rate and total is not None and h["state"] == "running" else None
        return JobInfo(
            job_id=job_id, state=h["state"], model=h.get("model"), dest=h.get("dest") or None,
            total=total, chunks=int(h["chunks"]) if h.get("chunks") else None,
            chunks_done=int(h.get("chunks_done", 0)), succeeded=int(h.get("succeeded", 0)),
            failed=int(h.get("failed", 0)), dead_chunks=int(h.get("dead_chunks", 0)),
            submitted_at=_iso(h.get("submitted_at")), started_at=_iso(h.get("started_at")),
            finished_at=_iso(h.get("finished_at")), rate=rate, eta_s=eta)

    def dead_letters(self, job_id: str) -> list[DeadLetter]:
        out = []
        for chunk, raw in self.r.hgetall(self.key(job_id, "dead")).items():
            d = json.loads(raw)
            out.append(DeadLetter(job_id=job_id, chunk=int(chunk), uris=d["uris"], error=d["error"],
                                  attempts=d["attempts"], at=d["at"]))
        return sorted(out, key=lambda d: d.chunk)

    def reset_attempts(self, job_id: str, chunk: int) -> None:
        """Before a re-drive: the chunk gets a fresh allowance of attempts, and the job runs again."""
        with self.r.pipeline() as p:
            p.hdel(self.key(job_id, "attempts"), chunk)
            p.hset(self.key(job_id), "state", "running")
            p.hdel(self.key(job_id), "finished_at")
            p.execute()

    # -- worker side --
    def job_state(self, job_id: str) -> str | None:
        """The job's state (None when Redis does not know it): workers poll it to drop the rest
        of a chunk whose job was cancelled while the chunk was in flight."""
        return self.r.hget(self.key(job_id), "state")

    def start_chunk(self, job_id: str, chunk: int) -> tuple[str, int]:
        """Mark the job running; returns (state before, this chunk's delivery number)."""
        state = self._start(keys=[self.key(job_id)], args=[time.time()])
        if state == "missing":
            return state, 0
        k = self.key(job_id, "attempts")
        n = self.r.hincrby(k, chunk, 1)
        self.r.expire(k, self.ttl)
        return state, n

    def note_error(self, job_id: str, chunk: int, message: str) -> None:
        k = self.key(job_id, "lasterr")
        self.r.hset(k, chunk, message[:2000])
        self.r.expire(k, self.ttl)

    def last_error(self, job_id: str, chunk: int) -> str | None:
        return self.r.hget(self.key(job_id, "lasterr"), chunk)

    def complete_chunk(self, job_id: str, chunk: int, ok: int, failed: int) -> bool:
        """Record a chunk's outcome (idempotent). True when every chunk of a sealed job is done:
        the caller then writes the manifest (which is idempotent too)."""
        keys = [self.key(job_id), self.key(job_id, "done"), self.key(job_id, "dead")]
        return bool(self._complete(keys=keys, args=[chunk, ok, failed, time.time(), self.ttl]))

    def mark_dead(self, job_id: str, chunk: int, uris: list[str], error: str, attempts: int) -> None:
        k = self.key(job_id, "dead")
        entry = json.dumps({"uris": uris, "error": error, "attempts": attempts, "at": time.time()})
        if self.r.hset(k, chunk, entry):
            self.r.hincrby(self.key(job_id), "dead_chunks", 1)
        self.r.expire(k, self.ttl)

    def mark_done(self, job_id: str) -> None:
        k = self.key(job_id)
        if self.r.hget(k, "state") != "cancelled":
            self.r.hset(k, mapping={"state": "done", "finished_at": time.time()})

    # -- Redis as the results destination --
    def put_part(self, job_id: str, chunk: int, jsonl: bytes) -> None:
        self.r.set(self.key(job_id, "part", str(chunk)), jsonl, ex=self.ttl)

    def get_part(self, job_id: str, chunk: int) -> str | None:
        return self.r.get(self.key(job_id, "part", str(chunk)))

    def iter_parts(self, job_id: str, chunks: int) -> Iterator[tuple[int, str | None]]:
        for c in range(chunks):
            yield c, self.get_part(job_id, c)
