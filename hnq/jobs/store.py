"""Job state in Redis: counters and pointers only, never the results themselves (those go to DEST).
Long: JobStore and the Lua scripts it runs change together, so they stay in one module.

Every update is idempotent, because at-least-once delivery means a chunk can finish twice (a
redelivered chunk, or two workers racing past the visibility timeout): per-chunk outcomes live in a
hash, and the job's counters are adjusted by the difference, atomically, in Lua.

Keys (all under ``hnq:``, expiring ``results_ttl_days`` after the last write). A job's keys are
``hnq:job:{ID}...`` (written ``hnq:job:ID`` below): the braces are a Redis Cluster hash tag. Every
Lua script here (and in hnq.jobs.dispatch) declares its keys and touches the keys of one job only,
or one key of no job: a Redis Cluster could run them. kombu has no Cluster transport today, so a
fleet runs on one Redis (with replicas and Sentinel: hnq.redis_conn), not on a Cluster.
  hnq:jobs                    ZSET job id -> submit time (for `hardnet status` without a job)
  hnq:job:ID                  HASH model, dest, state, total, chunks, sealed, succeeded, failed,
                                   options (JSON, hnq.options: format, top_k, weights, tag),
                                   priority, dwm (hnq.jobs.dispatch), …
  hnq:job:ID:done             HASH chunk -> "ok failed time" (time: when its part was written)
  hnq:job:ID:attempts         HASH chunk -> deliveries so far
  hnq:job:ID:lasterr          HASH chunk -> last error message
  hnq:job:ID:dead             HASH chunk -> dead letter (JSON: count, error, attempts, at)
  hnq:job:ID:codes            HASH chunk -> its error records per code (JSON)
  hnq:job:ID:errcodes         HASH code -> error records of the job (adjusted by difference)
  hnq:job:ID:weights          SET  weights the records were made with
  hnq:job:ID:wsha             HASH weights -> sha256 of their checkpoint (provenance)
  hnq:job:ID:ready            LIST "CHUNK COUNT DIGEST" of chunks sent and not yet dispatched into
                                   the Celery queue (hnq.jobs.dispatch: fair share between jobs)
  hnq:active:QUEUE            ZSET job -> priority rank x 1e13 + ms it was last served: the jobs
                                   of QUEUE with ready chunks, in the order they are served
  hnq:job:ID:seen             HASH chunk -> "p TIME" (sent: on the ready list), "q TIME"
                                   (dispatched into the queue), "s TIME" (started) or "r TIME" (a
                                   retry due then), for the sweeper
  hnq:job:ID:lease            HASH chunk -> "EXPIRY TOKEN": the attempt running it (renewed while
                                   it runs; hnq.jobs.sweep: a chunk with a live lease is in flight)
  hnq:job:ID:kept:N           HASH position -> record JSON: records of chunk N an attempt finished
                                   before it failed (the next attempt fetches only the others)
  hnq:job:ID:final            STRING the finalisation lease (holder's token; expires if it dies)
  hnq:job:ID:hb               STRING the listing submit's heartbeat (expires when it is gone)
  hnq:job:ID:ended            LIST   the final state, pushed when the job ends (waiting CLIs BLPOP it)
  hnq:wm:QUEUE                STRING latest dispatch time of a chunk taken from QUEUE (FIFO watermark)
  hnq:job:ID:in:N             STRING the chunk's stored URIs (gzip JSONL) when DEST is Redis
  hnq:job:ID:part:N           STRING the chunk's JSONL records when DEST is Redis
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from hnq.formats import skipped_from_fields
from hnq.options import DEFAULT_OPTIONS
from hnq.redis_conn import SentinelOptions, client as redis_client, same_master
from hnq.schema import JobInfo

PREFIX = "hnq"

# KEYS: job, done, dead, codes, errcodes, weights, seen, kept (hnq:job:ID:kept:N), lease
# ARGV: chunk, ok, failed, now, ttl, codes (JSON object code -> n), weights, mode ('ok'|'dead'), dead entry,
#       lease token ('' = none), '1' to drop the kept records
# Returns 1 when the job is now complete, 0 when not, -1 when mode 'dead' found the chunk completed
# by an earlier attempt (nothing changed: its part and counts stand). A completed chunk's sweeper
# bookkeeping (its seen entry) is deleted: nothing reads it once the chunk is done (its attempts
# stay: they say whether it was retried). In mode 'ok', first and whatever the outcome, what the
# worker did after its completion in round trips of their own: the chunk's kept records dropped
# (its part is written) and the attempt's lease released (only while it is the token's).
_COMPLETE = """
if ARGV[8] == 'ok' then
  if ARGV[11] == '1' then redis.call('DEL', KEYS[8]) end
  if ARGV[10] ~= '' then
    local cur = redis.call('HGET', KEYS[9], ARGV[1])
    if cur and string.match(cur, '^%S+ (%S+)$') == ARGV[10] then redis.call('HDEL', KEYS[9], ARGV[1]) end
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end  -- Redis lost the job: `hardnet resume` rebuilds it
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local dead_now = redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1
if ARGV[8] == 'dead' and prev and not dead_now then return -1 end
-- counted once: a later completion of a completed chunk changes nothing (its part stands too)
if ARGV[8] == 'ok' and prev and not dead_now then return 2 end
if prev then
  local pok, pf = string.match(prev, '(%d+) (%d+)')
  redis.call('HINCRBY', KEYS[1], 'succeeded', 0 - tonumber(pok))
  redis.call('HINCRBY', KEYS[1], 'failed', 0 - tonumber(pf))
  local pc = redis.call('HGET', KEYS[4], ARGV[1])
  if pc then
    for code, n in pairs(cjson.decode(pc)) do
      if redis.call('HINCRBY', KEYS[5], code, 0 - n) <= 0 then redis.call('HDEL', KEYS[5], code) end
    end
  end
else
  redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
redis.call('HINCRBY', KEYS[1], 'succeeded', tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'failed', tonumber(ARGV[3]))
redis.call('HSET', KEYS[4], ARGV[1], ARGV[6])
for code, n in pairs(cjson.decode(ARGV[6])) do redis.call('HINCRBY', KEYS[5], code, n) end
if ARGV[7] ~= '' then redis.call('SADD', KEYS[6], ARGV[7]) end
if ARGV[8] == 'dead' then
  if redis.call('HSET', KEYS[3], ARGV[1], ARGV[9]) == 1 then redis.call('HINCRBY', KEYS[1], 'dead_chunks', 1) end
elseif dead_now then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'dead_chunks', -1)
end
if ARGV[8] == 'ok' then redis.call('HDEL', KEYS[7], ARGV[1]) end
for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end  -- ended (or cancelled, abandoned): no finaliser
if redis.call('HGET', KEYS[1], 'sealed') == '1' and
   tonumber(redis.call('HGET', KEYS[1], 'chunks_done')) >= tonumber(redis.call('HGET', KEYS[1], 'chunks')) then
  return 1
end
return 0
"""

# KEYS: job ; ARGV: total, chunks, ttl
_SEAL = """
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'chunks', ARGV[2], 'sealed', '1')
if ARGV[3] then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'chunks_done') or '0') >= tonumber(ARGV[2]) then return 1 end
return 0
"""

# A chunk starts (a Lua function of _START and _CLAIM_START): the job running, one more delivery,
# seen[chunk] = "s <now>" (started, for the sweeper); returns the delivery number and the time the
# chunk was dispatched ('' if it was not "q").
_START_FN = """
local function start_chunk(state, job, attempts, seen, chunk, now, ttl)
  if state == 'queued' then
    redis.call('HSET', job, 'state', 'running', 'started_at', now)
  end
  local n = redis.call('HINCRBY', attempts, chunk, 1)
  local prev = redis.call('HGET', seen, chunk)
  local sent = ''
  if prev and string.sub(prev, 1, 2) == 'q ' then sent = string.sub(prev, 3) end
  redis.call('HSET', seen, chunk, 's ' .. now)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', attempts, ttl)
  redis.call('EXPIRE', seen, ttl)
  return n, sent
end
"""
# KEYS: job, attempts, seen ; ARGV: now, chunk, ttl.  Returns {state before, delivery number,
# the job's queue, the dispatch time}: the caller moves the queue's watermark with it (_WATERMARK:
# a key of no job, so not in this script).
_START = _START_FN + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', 0, '', ''} end
local n, sent = start_chunk(state, KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[1], ARGV[3])
return {state, n, redis.call('HGET', KEYS[1], 'queue') or '', sent}
"""

# KEYS: watermark (hnq:wm:QUEUE) ; ARGV: time.  The latest dispatch time of a chunk taken from the
# queue: every chunk dispatched before it has left the list, since the list is FIFO.
_WATERMARK = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: job, final lease, ended ; ARGV: state, now, error, lease token ('' = none), ttl.  A final
# state only from queued/running (monotonic: done, failed, cancelled or abandoned stay;
# `resume`/`redrive` reopen a job first), and only by the holder of the finalisation lease when one
# is given. The state is pushed onto hnq:job:ID:ended, which waiting CLIs BLPOP (producer.progress).
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state ~= 'queued' and state ~= 'running' then return state end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return 'lease_lost' end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) else redis.call('HDEL', KEYS[1], 'error') end
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return ARGV[1]
"""

# KEYS: job, ended ; ARGV: now, ttl.  Cancel only a job that is still queued or running; returns
# its state.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('LPUSH', KEYS[2], 'cancelled')
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 'cancelled'
end
return state
"""


# KEYS: lease ; ARGV: token, 'renew'|'release', ttl ms.  Only the holder renews or releases it.
_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'renew' then return redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return redis.call('DEL', KEYS[1])
"""

# KEYS: job, heartbeat, ended ; ARGV: now, ttl.  A live job whose submit had a heartbeat, never
# sealed, whose heartbeat expired: abandoned (its producer is gone; `hardnet resume` seals what was
# stored).
_ABANDON = """
local h = redis.call('HMGET', KEYS[1], 'state', 'sealed', 'hb')
if (h[1] ~= 'queued' and h[1] ~= 'running') or h[2] == '1' or h[3] ~= '1' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'abandoned', 'finished_at', ARGV[1], 'error',
           'its submit stopped listing (no heartbeat): hardnet resume seals and finishes what was stored')
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[3], 'abandoned')
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 1
"""


# KEYS: job, done, dead, lease ; ARGV: chunk, now, expiry, token, ttl.  Returns {verdict, time}:
# 'missing' (Redis lost the job), 'cancelled', 'done' (completed, not dead-lettered: nothing to do),
# 'busy' + the other attempt's lease expiry, or 'ok' + ours (the lease is taken).
_CLAIM_LEASE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', '0'} end
if state == 'cancelled' then return {'cancelled', '0'} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  return {'done', '0'}
end
local cur = redis.call('HGET', KEYS[4], ARGV[1])
if cur then
  local exp, tok = string.match(cur, '^(%S+) (%S+)$')
  if tok ~= ARGV[4] and tonumber(exp) and tonumber(exp) > tonumber(ARGV[2]) then return {'busy', exp} end
end
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3] .. ' ' .. ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[5])
"""
_CLAIM = _CLAIM_LEASE + "return {'ok', ARGV[3]}\n"

# KEYS: job, done, dead, lease, attempts, seen, kept (hnq:job:ID:kept:N) ; ARGV: chunk, now, expiry,
# token, ttl, now (unrounded).  _CLAIM, then (only when the lease is taken) _START in the same
# script: {'ok', expiry, state before, delivery number, the job's queue, the dispatch time ('' if
# the chunk was not "q"), 1 when an earlier attempt kept records (0: none to read)}; any other
# verdict as _CLAIM returns it, nothing started. One round trip where a delivery made two (three
# with the kept records' read).
_CLAIM_START = _START_FN + _CLAIM_LEASE + """
local n, sent = start_chunk(state, KEYS[1], KEYS[5], KEYS[6], ARGV[1], ARGV[6], ARGV[5])
return {'ok', ARGV[3], state, n, redis.call('HGET', KEYS[1], 'queue') or '', sent, redis.call('EXISTS', KEYS[7])}
"""

# KEYS: lease ; ARGV: chunk, token, 'renew'|'release', expiry.  Only the holder renews or releases.
_CHUNK_LEASE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local _, tok = string.match(cur, '^(%S+) (%S+)$')
if tok ~= ARGV[2] then return 0 end
if ARGV[3] == 'renew' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[4] .. ' ' .. ARGV[2]) return 1 end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS: part ; ARGV: data, expected sha1 ('' = only if absent), ttl.  1 written, 0 condition failed.
_PUT_PART_IF = """
local cur = redis.call('GET', KEYS[1])
if ARGV[2] == '' then
  if cur then return 0 end
elseif not cur or redis.sha1hex(cur) ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
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


def _options(raw: str | None) -> dict | None:
    """The job's non-default options as submitted (None for the defaults)."""
    if not raw:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    out = {k: v for k, v in d.items() if getattr(DEFAULT_OPTIONS, k, object()) != v}
    return out or None


def _iso(ts: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(ts), timezone.utc) if ts else None


@dataclass
class DeadLetter:
    job_id: str
    chunk: int
    count: int
    error: str
    attempts: int
    at: float


class JobStore:
    """Job state for one Redis. Both sides use it; it holds one connection pool.

    ``patient`` (the default, for workers and `--wait`): ride out a Redis restart with about two
    minutes of backoff. The CLI checks first contact with :meth:`ping_fast` instead, so an
    unreachable broker is reported within seconds."""

    def __init__(self, url: str, ttl_days: int = 14, client: redis.Redis | None = None, *,
                 sentinel: SentinelOptions | None = None):
        """``url``: HARDNET_BROKER_URL; ``sentinel``: its master's name and options when it is a
        ``sentinel://`` URL (hnq.redis_conn)."""
        self.url = url
        self.sentinel = sentinel
        # Ride out a Redis restart or a Sentinel failover (about two minutes of backoff) instead
        # of dying: under Sentinel a lost master (MasterNotFoundError) and a demoted one
        # (ReadOnlyError, turned into ConnectionError by redis-py) are ConnectionErrors, and each
        # new connection asks the sentinels for the master again.
        self.r = client or redis_client(
            url, sentinel, decode_responses=True, socket_timeout=30, socket_connect_timeout=10,
            health_check_interval=10,
            retry=_Retry(ExponentialBackoff(cap=10, base=0.2), 25),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.ttl = ttl_days * 86400
        self._complete = self.r.register_script(_COMPLETE)
        self._seal = self.r.register_script(_SEAL)
        self._start = self.r.register_script(_START)
        self._watermark = self.r.register_script(_WATERMARK)
        self._finish = self.r.register_script(_FINISH)
        self._cancel = self.r.register_script(_CANCEL)
        self._lease = self.r.register_script(_LEASE)
        self._abandon = self.r.register_script(_ABANDON)
        self._claim = self.r.register_script(_CLAIM)
        self._claim_start = self.r.register_script(_CLAIM_START)
        self._chunk_lease = self.r.register_script(_CHUNK_LEASE)
        self._put_part_if = self.r.register_script(_PUT_PART_IF)

    @classmethod
    def from_settings(cls, s, **kw) -> "JobStore":
        """The job store of a settings object (hnq.settings.CommonSettings or a subclass)."""
        return cls(s.broker_url, s.results_ttl_days, sentinel=s.sentinel(), **kw)

    def ping_fast(self, within_s: float = 8.0) -> None:
        """Raise redis.ConnectionError (or AuthenticationError) unless Redis answers within about
        ``within_s`` seconds: a short-lived client without the long retry."""
        deadline = time.monotonic() + within_s
        while True:
            left = deadline - time.monotonic()
            c = redis_client(self.url, self.sentinel, socket_connect_timeout=max(0.5, min(3.0, left)),
                             socket_timeout=max(0.5, min(3.0, left)), retry=None)
            try:
                c.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + 1.0 > deadline:
                    raise
                time.sleep(0.5)
            finally:
                c.close()

    # -- keys --
    @staticmethod
    def key(job_id: str, *parts: str) -> str:
        """``hnq:job:{ID}:PART...``: the braces are a Redis Cluster hash tag, so that all of a job's
        keys live in one slot and the Lua scripts (which touch one job's keys) could run there."""
        return ":".join((PREFIX, "job", "{" + job_id + "}") + parts)

    # -- producer side --
    def create(self, job_id: str, *, model: str, dest: str | None, weights: str | None = None,
               queue: str | None = None, sources: list[str] | None = None, chunk_size: int | None = None,
               submitted_at: float | None = None, state: str = "queued", options: str | None = None,
               priority: str = "normal") -> None:
        """``options``: the job's JobOptions as JSON (None / '' = the defaults); ``priority``: its
        share of the fleet (hnq.jobs.dispatch)."""
        k = self.key(job_id)
        now = submitted_at or time.time()
        with self.r.pipeline() as p:
            p.hset(k, mapping={"model": model, "dest": dest or "", "state": state,
                               "submitted_at": now, "sealed": 0, "chunks_done": 0,
                               "succeeded": 0, "failed": 0, "dead_chunks": 0,
                               "weights": weights or "", "queue": queue or "",
                               "sources": json.dumps((sources or [])[:100]),
                               "chunk_size": chunk_size or 0, "options": options or "",
                               "priority": priority})
            p.expire(k, self.ttl)
            p.zadd(f"{PREFIX}:jobs", {job_id: now})
            p.execute()

    def raw(self, job_id: str) -> dict[str, str]:
        return self.r.hgetall(self.key(job_id))

    def seal(self, job_id: str, total: int, chunks: int) -> bool:
        """Listing finished: record the totals. True if every chunk already finished (the caller
        must then have the job finalised, since no worker will see a last chunk any more)."""
        return bool(self._seal(keys=[self.key(job_id)], args=[total, chunks, self.ttl]))

    def mark_sent(self, job_id: str, chunks: list[int], at: float | None = None) -> None:
        """Sweeper bookkeeping: these chunks were just put in the queue."""
        if not chunks:
            return
        k = self.key(job_id, "seen")
        v = f"q {at or time.time():.3f}"
        with self.r.pipeline(transaction=False) as p:
            p.hset(k, mapping={str(c): v for c in chunks})
            p.expire(k, self.ttl)
            p.expire(self.key(job_id), self.ttl)    # a job queued behind a long one keeps its state
            p.execute()

    def seen(self, job_id: str) -> dict[int, tuple[str, float]]:
        out = {}
        for c, v in self.r.hscan_iter(self.key(job_id, "seen"), count=1000):
            kind, _, ts = v.partition(" ")
            out[int(c)] = (kind, float(ts or 0))
        return out

    def done_times(self, job_id: str) -> dict[int, float]:
        """chunk -> when its outcome was recorded (chunks recorded before times were kept: absent)."""
        out = {}
        for c, v in self.r.hscan_iter(self.key(job_id, "done"), count=1000):
            parts = v.split()
            if len(parts) >= 3:
                out[int(c)] = float(parts[2])
        return out

    def done_chunks(self, job_id: str) -> set[int]:
        return {int(c) for c in self.r.hkeys(self.key(job_id, "done"))}

    def watermark(self, queue: str) -> float:
        return float(self.r.get(f"{PREFIX}:wm:{queue}") or 0)

    def cancel(self, job_id: str) -> str:
        """'cancelled', or the state that made cancelling pointless ('done', 'failed', ...), or
        'missing'. A finished job is never changed."""
        return self._cancel(keys=[self.key(job_id), self.key(job_id, "ended")], args=[time.time(), self.ttl])

    def recent(self, n: int = 20) -> list[str]:
        return list(self.r.zrevrange(f"{PREFIX}:jobs", 0, n - 1))

    def info(self, job_id: str) -> JobInfo | None:
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(self.key(job_id))
            p.hgetall(self.key(job_id, "errcodes"))
            h, codes = p.execute()
        if not h:
            return None
        done = int(h.get("succeeded", 0)) + int(h.get("failed", 0))
        started = float(h["started_at"]) if h.get("started_at") else None
        end = float(h["finished_at"]) if h.get("finished_at") else time.time()
        rate = done / (end - started) if started and end > started and done else None
        total = int(h["total"]) if h.get("total") else None
        eta = (total - done) / rate if rate and total is not None and h["state"] == "running" else None
        by_ext, exts = skipped_from_fields(h)   # --extensions (hnq.formats)
        return JobInfo(
            job_id=job_id, state=h["state"], model=h.get("model"), dest=h.get("dest") or None,
            total=total, chunks=int(h["chunks"]) if h.get("chunks") else None,
            chunks_done=int(h.get("chunks_done", 0)), succeeded=int(h.get("succeeded", 0)),
            failed=int(h.get("failed", 0)), dead_chunks=int(h.get("dead_chunks", 0)),
            skipped=int(h.get("skipped", 0) or 0), skipped_by_extension=by_ext, skipped_extensions=exts,
            submitted_at=_iso(h.get("submitted_at")), started_at=_iso(h.get("started_at")),
            finished_at=_iso(h.get("finished_at")), rate=rate, eta_s=eta, error=h.get("error") or None,
            options=_options(h.get("options")), priority=h.get("priority") or "normal",
            error_codes={k: int(v) for k, v in sorted(codes.items()) if int(v) > 0})

    def weights_used(self, job_id: str) -> list[str]:
        return sorted(self.r.smembers(self.key(job_id, "weights")))

    def note_weights_sha256(self, job_id: str, weights: str, sha256: str) -> None:
        """Provenance: the sha256 of the checkpoint that made records ``weights`` (manifest)."""
        k = self.key(job_id, "wsha")
        with self.r.pipeline(transaction=False) as p:
            p.hset(k, weights, sha256)
            p.expire(k, self.ttl)
            p.execute()

    def weights_sha256(self, job_id: str) -> dict[str, str]:
        return dict(sorted(self.r.hgetall(self.key(job_id, "wsha")).items()))

    def dead_letters(self, job_id: str) -> list[DeadLetter]:
        out = []
        for chunk, raw in self.r.hgetall(self.key(job_id, "dead")).items():
            d = json.loads(raw)
            out.append(DeadLetter(job_id=job_id, chunk=int(chunk), count=d.get("count", 0), error=d["error"],
                                  attempts=d["attempts"], at=d["at"]))
        return sorted(out, key=lambda d: d.chunk)

    def reset_attempts(self, job_id: str, chunk: int) -> None:
        """Before a re-drive or a re-send: the chunk gets a fresh allowance of attempts, and the
        job runs again."""
        with self.r.pipeline() as p:
            p.hdel(self.key(job_id, "attempts"), chunk)
            p.hset(self.key(job_id), "state", "running")
            p.hdel(self.key(job_id), "finished_at", "error")
            p.delete(self.key(job_id, "ended"))
            p.execute()

    # -- worker side --
    def job_state(self, job_id: str) -> str | None:
        """The job's state (None when Redis does not know it): workers poll it to drop the rest
        of a chunk whose job was cancelled while the chunk was in flight."""
        return self.r.hget(self.key(job_id), "state")

    def start_chunk(self, job_id: str, chunk: int) -> tuple[str, int]:
        """Mark the job running and move its queue's watermark; returns (state before, this
        chunk's delivery number)."""
        keys = [self.key(job_id), self.key(job_id, "attempts"), self.key(job_id, "seen")]
        state, n, queue, sent = self._start(keys=keys, args=[time.time(), chunk, self.ttl])
        self._move_watermark(queue, sent)
        return state, int(n)

    def _move_watermark(self, queue: str, sent: str) -> None:
        if sent:
            self._watermark(keys=[f"{PREFIX}:wm:{queue or 'hardnet'}"], args=[sent])

    def note_error(self, job_id: str, chunk: int, message: str) -> None:
        k = self.key(job_id, "lasterr")
        self.r.hset(k, chunk, message[:2000])
        self.r.expire(k, self.ttl)

    def last_error(self, job_id: str, chunk: int) -> str | None:
        return self.r.hget(self.key(job_id, "lasterr"), chunk)

    def _outcome_keys(self, job_id: str, chunk: int) -> list[str]:
        return [self.key(job_id), self.key(job_id, "done"), self.key(job_id, "dead"),
                self.key(job_id, "codes"), self.key(job_id, "errcodes"), self.key(job_id, "weights"),
                self.key(job_id, "seen"), self.key(job_id, "kept", str(chunk)), self.key(job_id, "lease")]

    def complete_chunk(self, job_id: str, chunk: int, ok: int, failed: int,
                       codes: dict[str, int] | None = None, weights: str | None = None, *,
                       drop_kept: bool = False, lease: str | None = None) -> bool:
        """Record a chunk's outcome (idempotent; ``codes``: error records per code). True when
        every chunk of a sealed job is done: the caller then finalises the job. In the same round
        trip, whatever the outcome: ``drop_kept`` deletes the records earlier attempts kept
        (:meth:`drop_kept`), ``lease`` releases that token's lease of the chunk
        (:meth:`release_chunk_lease`)."""
        args = [chunk, ok, failed, time.time(), self.ttl, json.dumps(codes or {}), weights or "", "ok", "",
                lease or "", "1" if drop_kept else ""]
        return self._complete(keys=self._outcome_keys(job_id, chunk), args=args) == 1

    def complete_dead(self, job_id: str, chunk: int, count: int, error: str, attempts: int, *,
                      ok: int = 0, codes: dict[str, int] | None = None) -> int | None:
        """Record a dead-lettered chunk (``count`` URIs; ``ok`` of them labelled by earlier
        attempts and in its part, ``codes`` its error records, default all chunk_failed),
        atomically, unless an earlier attempt completed it: then nothing changes and None is
        returned (its part must be kept). Else 1 if the job is now complete, 0 if not."""
        entry = json.dumps({"count": count, "error": error[:2000], "attempts": attempts, "at": time.time()})
        codes = codes if codes is not None else {"chunk_failed": count - ok}
        args = [chunk, ok, count - ok, time.time(), self.ttl, json.dumps(codes), "", "dead", entry, "", ""]
        res = self._complete(keys=self._outcome_keys(job_id, chunk), args=args)
        return None if res == -1 else int(res)

    def is_completed(self, job_id: str, chunk: int) -> bool:
        """The chunk has an outcome that is not a dead letter (its part was written)."""
        with self.r.pipeline(transaction=False) as p:
            p.hexists(self.key(job_id, "done"), chunk)
            p.hexists(self.key(job_id, "dead"), chunk)
            done, dead = p.execute()
        return bool(done and not dead)

    def finish(self, job_id: str, state: str, error: str | None = None, lease: str | None = None) -> str:
        """Set the final state of a queued or running job (an ended, cancelled or abandoned one is
        never changed); with ``lease`` only while that finalisation lease is held ('lease_lost'
        otherwise). Returns the state the job is in."""
        return self._finish(keys=[self.key(job_id), self.key(job_id, "final"), self.key(job_id, "ended")],
                            args=[state, time.time(), error or "", lease or "", self.ttl])

    # -- finalisation lease and producer heartbeat (hnq.jobs.finish, hnq.jobs.liveness) --
    def take_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """hnq:job:ID:final: one finaliser at a time; it expires if its holder dies."""
        return bool(self.r.set(self.key(job_id, "final"), token, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        return bool(self._lease(keys=[self.key(job_id, "final")], args=[token, "renew", int(ttl_s * 1000)]))

    def release_lease(self, job_id: str, token: str) -> None:
        self._lease(keys=[self.key(job_id, "final")], args=[token, "release", 0])

    def heartbeat(self, job_id: str, ttl_s: float) -> None:
        """hnq:job:ID:hb, refreshed by a listing submit (or resume); ``hb`` in the job hash says
        the job has one, so the sweeper may judge it abandoned once it expires."""
        with self.r.pipeline(transaction=False) as p:
            p.set(self.key(job_id, "hb"), f"{time.time():.3f}", px=int(ttl_s * 1000))
            p.hset(self.key(job_id), "hb", "1")
            p.execute()

    def wait_ended(self, job_id: str, timeout_s: float) -> str | None:
        """Block up to ``timeout_s`` for the job to reach a final state (hnq:job:ID:ended, pushed
        by the scripts that end a job); its state, or None. The state is pushed back, for the
        other waiters: call :meth:`info` to see whether it still holds (a resume reopens a job)."""
        t0 = time.monotonic()
        try:
            got = self.r.blpop([self.key(job_id, "ended")], timeout=max(0.01, timeout_s))
        except (redis.ConnectionError, redis.TimeoutError):
            # Redis restarting or failing over: wait out the interval; the caller's next read
            # (JobStore.info) rides it out with the store's patient retry
            time.sleep(max(0.0, timeout_s - (time.monotonic() - t0)))
            return None
        if got is None:
            return None
        if self.r.hget(self.key(job_id), "state") != got[1]:
            # stale: the job was reopened since (resume, redrive); dropped, and the wait goes on
            time.sleep(max(0.0, timeout_s - (time.monotonic() - t0)))
            return None
        with self.r.pipeline(transaction=False) as p:
            p.lpush(self.key(job_id, "ended"), got[1])
            p.expire(self.key(job_id, "ended"), self.ttl)
            p.execute()
        return got[1]

    def end_heartbeat(self, job_id: str) -> None:
        self.r.delete(self.key(job_id, "hb"))

    def abandon_if_gone(self, job_id: str) -> bool:
        """A queued/running job that has a heartbeat, is not sealed and whose heartbeat expired:
        now 'abandoned' (True). Atomic against a seal or a heartbeat arriving meanwhile."""
        return bool(self._abandon(keys=[self.key(job_id), self.key(job_id, "hb"), self.key(job_id, "ended")],
                                  args=[time.time(), self.ttl]))

    def reopen(self, job_id: str) -> None:
        """`hardnet resume` of an abandoned job: running again, so that it can end."""
        with self.r.pipeline() as p:
            p.hset(self.key(job_id), "state", "running")
            p.hdel(self.key(job_id), "finished_at", "error")
            p.delete(self.key(job_id, "ended"))
            p.expire(self.key(job_id), self.ttl)
            p.execute()

    # kept for callers of the former API
    def mark_done(self, job_id: str) -> None:
        self.finish(job_id, "done")

    # -- claim-check inputs when DEST is Redis --
    def put_inputs(self, job_id: str, chunk: int, data: bytes) -> None:
        self.r.set(self.key(job_id, "in", str(chunk)), data, ex=self.ttl)

    def get_inputs(self, job_id: str, chunk: int) -> bytes | None:
        v = self._binary().get(self.key(job_id, "in", str(chunk)))
        return v

    def _binary(self) -> redis.Redis:
        if not hasattr(self, "_rb"):
            self._rb = same_master(self.r, decode_responses=False)   # plain or Sentinel
        return self._rb

    # -- Redis as the results destination --
    def put_part(self, job_id: str, chunk: int, jsonl: bytes) -> None:
        self.r.set(self.key(job_id, "part", str(chunk)), jsonl, ex=self.ttl)

    def get_part(self, job_id: str, chunk: int) -> str | None:
        return self.r.get(self.key(job_id, "part", str(chunk)))

    def iter_parts(self, job_id: str, chunks: int) -> Iterator[tuple[int, str | None]]:
        for c in range(chunks):
            yield c, self.get_part(job_id, c)

    # -- per-chunk leases (worker.chunk takes them, hnq.jobs.sweep reads them) --
    def claim_chunk(self, job_id: str, chunk: int, token: str, lease_s: float) -> tuple[str, float]:
        """Before any work on a delivery: ('done', 0) when the chunk is completed (not
        dead-lettered); ('busy', expiry) when another attempt holds a live lease; ('ok', expiry)
        when this attempt now holds it; ('missing', 0) / ('cancelled', 0) as the job's state says."""
        now = time.time()
        keys = [self.key(job_id), self.key(job_id, "done"), self.key(job_id, "dead"), self.key(job_id, "lease")]
        verdict, at = self._claim(keys=keys, args=[chunk, f"{now:.3f}", f"{now + lease_s:.3f}", token, self.ttl])
        return verdict, float(at)

    def claim_and_start(self, job_id: str, chunk: int, token: str,
                        lease_s: float) -> tuple[str, float, tuple[str, int, bool] | None]:
        """:meth:`claim_chunk` and, when the lease is taken, :meth:`start_chunk` in one script:
        (verdict, time, started), where started is (state before, delivery number, whether an
        earlier attempt kept records) for 'ok' and None for any other verdict (nothing started)."""
        now = time.time()
        keys = [self.key(job_id), self.key(job_id, "done"), self.key(job_id, "dead"), self.key(job_id, "lease"),
                self.key(job_id, "attempts"), self.key(job_id, "seen"), self.key(job_id, "kept", str(chunk))]
        got = self._claim_start(keys=keys, args=[chunk, f"{now:.3f}", f"{now + lease_s:.3f}", token, self.ttl, now])
        if got[0] != "ok":
            return got[0], float(got[1]), None
        _, at, state, n, queue, sent, kept = got
        self._move_watermark(queue, sent)
        return "ok", float(at), (state, int(n), bool(kept))

    def renew_chunk_lease(self, job_id: str, chunk: int, token: str, lease_s: float) -> bool:
        """Push the lease's expiry on; False when it is no longer ours."""
        return bool(self._chunk_lease(keys=[self.key(job_id, "lease")],
                                      args=[chunk, token, "renew", f"{time.time() + lease_s:.3f}"]))

    def release_chunk_lease(self, job_id: str, chunk: int, token: str) -> None:
        self._chunk_lease(keys=[self.key(job_id, "lease")], args=[chunk, token, "release", "0"])

    def chunk_leases(self, job_id: str) -> dict[int, float]:
        """chunk -> expiry of the lease of the attempt running it (expired ones included)."""
        out = {}
        for c, v in self.r.hscan_iter(self.key(job_id, "lease"), count=1000):
            out[int(c)] = float(v.split(" ", 1)[0])
        return out

    def mark_retry(self, job_id: str, chunk: int, at: float) -> None:
        """Sweeper bookkeeping: the chunk's failed attempt is retried at ``at`` (seen "r AT"; the
        retry is held by a worker, not in the list, so it moves no watermark)."""
        k = self.key(job_id, "seen")
        with self.r.pipeline(transaction=False) as p:
            p.hset(k, chunk, f"r {at:.3f}")
            p.expire(k, self.ttl)
            p.execute()

    def uncount_attempt(self, job_id: str, chunk: int) -> None:
        """An attempt handed back unfinished because its worker was stopping (worker.shutdown):
        it does not count against the chunk's attempts."""
        k = self.key(job_id, "attempts")
        if self.r.hincrby(k, chunk, -1) <= 0:
            self.r.hdel(k, chunk)

    def forget_attempts(self, job_id: str, chunks: list[int]) -> None:
        """A re-send (sweeper, resume): these chunks get a fresh allowance of attempts."""
        if chunks:
            self.r.hdel(self.key(job_id, "attempts"), *chunks)

    # -- records kept across attempts (hnq.jobs.parts.keep_records) --
    def keep_records(self, job_id: str, chunk: int, records: dict[int, str]) -> None:
        if not records:
            return
        k = self.key(job_id, "kept", str(chunk))
        with self.r.pipeline(transaction=False) as p:
            p.hset(k, mapping={str(i): v for i, v in records.items()})
            p.expire(k, self.ttl)
            p.execute()

    def kept_records(self, job_id: str, chunk: int) -> dict[int, str]:
        return {int(i): v for i, v in self.r.hgetall(self.key(job_id, "kept", str(chunk))).items()}

    def drop_kept(self, job_id: str, chunk: int) -> None:
        self.r.delete(self.key(job_id, "kept", str(chunk)))

    # -- conditional part writes when DEST is Redis --
    def get_part_versioned(self, job_id: str, chunk: int) -> tuple[bytes, str] | None:
        """(bytes, version) of the part, or None; the version is what :meth:`put_part_if` expects."""
        v = self._binary().get(self.key(job_id, "part", str(chunk)))
        return None if v is None else (v, hashlib.sha1(v).hexdigest())

    def put_part_if(self, job_id: str, chunk: int, jsonl: bytes, expect: str | None) -> bool:
        """Write the part only if it does not exist (``expect`` None) or still has version
        ``expect``; False when that condition failed (nothing written)."""
        return bool(self._put_part_if(keys=[self.key(job_id, "part", str(chunk))],
                                      args=[jsonl, expect or "", self.ttl]))
