"""Fair share between jobs: each job's chunks wait in a list of their own, and a short shared queue
is topped up from the jobs in turn.

The rule (docs/operations.md, "Several jobs at once"):

* Jobs are served by **priority first** (``hardnet submit --priority high|normal|low``; a higher
  level is always served before a lower one: ``low`` is for backfill that may wait), and **in turn
  within a priority**: the job served least recently gets the next chunk. A small job submitted
  behind a 100M-image one therefore starts after about ``HARDNET_DISPATCH_AHEAD`` chunks, plus the
  chunks the workers already hold, not after the big job.
* A chunk being sent (`submit`, `resume`, `redrive`, the sweeper) is pushed onto its job's *ready*
  list, ``hnq:job:{ID}:ready`` (entries ``"CHUNK COUNT DIGEST"``, about 40 bytes: Redis holds no
  message envelope for a chunk that waits), and the job joins ``hnq:active:QUEUE`` (a sorted set:
  score = priority rank x 1e13 + the time it was last served, in ms).
* **Dispatch** moves chunks from the ready lists into the Celery queue (the Redis list QUEUE)
  until it holds ``HARDNET_DISPATCH_AHEAD`` messages: take the turn of the job at the head of the
  sorted set (a script moves it to the back of its priority at once: two dispatchers never serve
  the same turn, and one that dies holding a turn loses nothing), pop its oldest ready chunk,
  publish its message; a job without ready chunks leaves the set. Every worker dispatches before
  each BRPOP of its consumer and every half second (worker.dispatcher); `submit` dispatches once
  after its first chunk, so that idle workers start at once.
* Workers keep prefetch 1 and late acks: the Celery queue stays short, the order is decided here.

What this changes for the other rules: the sweeper's "possibly queued" (hnq.jobs.sweep) knows a
fourth kind of chunk, ``p`` (pushed, not yet dispatched: waiting while its job's ready list is
not empty and no later-pushed chunk of the job was dispatched, the job's ``dwm``). A dispatcher
that dies between popping a chunk and publishing it: the chunk is in ``hnq:sending:QUEUE`` from
just after the pop until it is published, and any dispatcher pushes back what stayed there longer
than ``RECOVER_S`` (5 s; worker.dispatcher checks every few seconds); if the dispatcher died in the
one round trip between the pop and that note, the sweeper re-sends the chunk at its next pass
(``LOST_DISPATCH_S`` after it, hnq.jobs.sweep). The sweeper also puts back any live job whose ready list
is not empty but which is missing from the sorted set (:func:`reactivate`: a lost write). `cancel` needs
nothing: a cancelled job's ready chunks are dropped by the next dispatch.

Redis Cluster: the Lua scripts here touch one job's keys only (declared, under the job's hash tag);
the sorted set and the Celery queue are touched by plain commands, so no script crosses slots.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from hnq.jobs.store import PREFIX, JobStore
from hnq.options import JobOptions
from hnq.schema import ChunkTask
from hnq.settings import TASK_CLASSIFY

log = logging.getLogger("hardnet.dispatch")

#: the priorities of `submit --priority`, highest first (the rank is the index)
PRIORITIES = ("high", "normal", "low")
DEFAULT_PRIORITY = "normal"
_RANK_SCALE = 1e13       # > any time in ms (2286 AD); rank x scale + ms stays exact in a double

# KEYS: ready, seen, job ; ARGV: now, ttl, entry...   Push chunks (entries "CHUNK COUNT DIGEST")
# onto the job's ready list; seen[CHUNK] = "p NOW".
_PUSH = """
for i = 3, #ARGV do
  redis.call('LPUSH', KEYS[1], ARGV[i])
  redis.call('HSET', KEYS[2], string.match(ARGV[i], '^(%d+)'), 'p ' .. ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])   -- a job waiting behind a long one keeps its state
return redis.call('LLEN', KEYS[1])
"""

# KEYS: ready, seen, job ; ARGV: now.  Take the job's oldest ready chunk: {entry, ready left}, or
# {'', 0} when it has none, or {'', -1} when the job was cancelled or Redis lost it (its ready list
# is dropped: a worker would drop those chunks too). A chunk of an ended job is still sent: the
# worker acknowledges a done chunk without work, as any duplicate delivery. seen[CHUNK] = "q NOW"; the job's dwm = the latest push time
# of a dispatched chunk (hnq.jobs.sweep: a "p" chunk pushed before it is no longer waiting).
_TAKE = """
local state = redis.call('HGET', KEYS[3], 'state')
if not state or state == 'cancelled' then
  redis.call('DEL', KEYS[1])
  return {'', -1}
end
local e = redis.call('RPOP', KEYS[1])
if not e then return {'', 0} end
local c = string.match(e, '^(%d+)')
local prev = redis.call('HGET', KEYS[2], c)
if prev and string.sub(prev, 1, 2) == 'p ' then
  local t = tonumber(string.sub(prev, 3))
  if t and t > tonumber(redis.call('HGET', KEYS[3], 'dwm') or '0') then
    redis.call('HSET', KEYS[3], 'dwm', string.sub(prev, 3))
  end
end
redis.call('HSET', KEYS[2], c, 'q ' .. ARGV[1])
return {e, redis.call('LLEN', KEYS[1])}
"""


# KEYS: active (hnq:active:QUEUE) ; ARGV: now in ms.  The job whose turn it is (the head: highest
# priority, served least recently), moved to the back of its priority; nil when none. The job stays
# in the set: a dispatcher that dies holding a turn loses nothing. "The back" is after the last job
# of its priority even when that one was served in the same millisecond (equal scores would be
# ordered by job id: two turns in one ms served the same job twice, seen in a full run).
_TURN = """
local h = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #h == 0 then return false end
local base = math.floor(tonumber(h[2]) / 1e13) * 1e13
local score = base + tonumber(ARGV[1])
local last = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', base + 1e13),
                        string.format('%.0f', base), 'WITHSCORES', 'LIMIT', 0, 1)
if #last > 0 and last[1] ~= h[1] and tonumber(last[2]) >= score then score = tonumber(last[2]) + 1 end
redis.call('ZADD', KEYS[1], string.format('%.0f', score), h[1])
return h[1]
"""


def sending_key(queue: str) -> str:
    """The sorted set of the chunks being published to ``queue`` ("JOB ENTRY" -> when taken): one a
    dispatcher took and died before publishing is pushed back by any dispatcher after RECOVER_S."""
    return f"{PREFIX}:sending:{queue}"


#: seconds after which a chunk still in hnq:sending:QUEUE is taken to be lost (publishing takes ms)
RECOVER_S = 5.0
#: a publish slower than this is logged (the chunk may reach the queue after later ones)
SLOW_S = 1.0


def active_key(queue: str) -> str:
    """The sorted set of the jobs of ``queue`` that have ready chunks."""
    return f"{PREFIX}:active:{queue}"


def priority_rank(priority: str | None) -> int:
    try:
        return PRIORITIES.index(priority or DEFAULT_PRIORITY)
    except ValueError:
        return PRIORITIES.index(DEFAULT_PRIORITY)


def _score(priority: str | None, now: float) -> float:
    return priority_rank(priority) * _RANK_SCALE + int(now * 1000)


def entry(chunk: int, count: int, digest: str) -> str:
    return f"{chunk} {count} {digest}"


class ReadyLists:
    """The pushing side (producer, sweeper, resume) and the reading side (sweeper, status,
    exporter) of the ready lists of one Redis."""

    def __init__(self, store: JobStore):
        self.store = store
        self._push = store.r.register_script(_PUSH)
        self._take = store.r.register_script(_TAKE)
        self._turn = store.r.register_script(_TURN)

    def keys(self, job_id: str) -> list[str]:
        s = self.store
        return [s.key(job_id, "ready"), s.key(job_id, "seen"), s.key(job_id)]

    def push(self, job_id: str, queue: str, priority: str | None, chunks: list[tuple[int, int, str]],
             at: float | None = None) -> int:
        """Push ``chunks`` ((chunk, count, digest), oldest first) and make the job active on
        ``queue``; returns the job's ready chunks."""
        if not chunks:
            return 0
        now = at or time.time()
        with self.store.r.pipeline(transaction=False) as p:
            self._push(keys=self.keys(job_id),
                       args=[f"{now:.3f}", self.store.ttl, *(entry(*c) for c in chunks)], client=p)
            p.zadd(active_key(queue), {job_id: _score(priority, now)}, nx=True)
            n, _ = p.execute()
        return int(n)

    def take(self, job_id: str) -> tuple[str | None, int]:
        """(entry or None, chunks left; -1: the job is not live, its ready chunks were dropped)."""
        e, left = self._take(keys=self.keys(job_id), args=[f"{time.time():.3f}"])
        return (e or None), int(left)

    def turn(self, queue: str) -> str | None:
        """The job to serve next on ``queue`` (moved to the back of its priority), or None."""
        return self._turn(keys=[active_key(queue)], args=[int(time.time() * 1000)]) or None

    def leave(self, job_id: str, queue: str, priority: str | None) -> None:
        """The job had no ready chunk: out of the turn, unless a push came meanwhile (a push
        LPUSHes before its ZADD NX, so either that ZADD comes after this ZREM, or the LLEN sees
        the chunk)."""
        r = self.store.r
        r.zrem(active_key(queue), job_id)
        if r.llen(self.store.key(job_id, "ready")):
            r.zadd(active_key(queue), {job_id: _score(priority, time.time())}, nx=True)

    def put_back(self, job_id: str, queue: str, priority: str | None, e: str) -> None:
        """A taken chunk that could not be published goes back to the head of its job's list."""
        with self.store.r.pipeline(transaction=False) as p:
            p.rpush(self.store.key(job_id, "ready"), e)
            p.zadd(active_key(queue), {job_id: _score(priority, time.time())}, nx=True)
            p.execute()

    def waiting(self, job_id: str) -> int:
        return int(self.store.r.llen(self.store.key(job_id, "ready")))

    def backlog(self, queue: str) -> tuple[int, int]:
        """(chunks in the Celery queue, chunks in the ready lists of its active jobs)."""
        r = self.store.r
        jobs = r.zrange(active_key(queue), 0, -1)
        with r.pipeline(transaction=False) as p:
            p.llen(queue)
            for j in jobs:
                p.llen(self.store.key(j, "ready"))
            got = p.execute()
        return int(got[0]), sum(int(n) for n in got[1:])


@dataclass
class _JobFields:
    model: str
    dest: str | None
    options: JobOptions | None
    priority: str


class Dispatcher:
    """Tops up Celery queues from the jobs' ready lists (the rule in the module doc). Thread-safe;
    one per process is enough."""

    def __init__(self, store: JobStore, app, ahead: int = 4):
        self.store = store
        self.app = app
        self.ahead = max(1, ahead)
        self.ready = ready_lists(store)
        self._jobs: dict[str, _JobFields | None] = {}
        self._lock = threading.Lock()

    def _fields(self, job_id: str) -> _JobFields | None:
        f = self._jobs.get(job_id)
        if f is None:
            h = self.store.r.hmget(self.store.key(job_id), ["model", "dest", "options", "priority"])
            if h[0] is None:
                return None
            f = _JobFields(model=h[0], dest=h[1] or None,
                           options=JobOptions.from_json(h[2]).for_message(), priority=h[3] or DEFAULT_PRIORITY)
            with self._lock:
                self._jobs[job_id] = f
                while len(self._jobs) > 256:
                    del self._jobs[next(iter(self._jobs))]
        return f

    def top_up(self, queue: str, ahead: int | None = None, producer=None) -> int:
        """Move chunks into ``queue`` until it holds ``ahead`` messages (default: this
        dispatcher's) or no job has a ready chunk. Returns how many were moved."""
        want = (ahead or self.ahead) - int(self.store.r.llen(queue))
        moved = 0
        akey, skey = active_key(queue), sending_key(queue)
        while want > 0:
            job_id = self.ready.turn(queue)
            if job_id is None:
                break
            e, left = self.ready.take(job_id)
            if e is None:
                if left == 0:
                    f = self._fields(job_id)       # cached: no round trip for a job served before
                    self.ready.leave(job_id, queue, f.priority if f else None)
                else:       # cancelled or lost: its ready chunks were dropped
                    self.store.r.zrem(akey, job_id)
                continue
            f = self._fields(job_id)
            if f is None:      # Redis lost the job between the two calls: nothing to send
                log.warning("job %s: Redis no longer knows it; its chunk %s is not sent "
                            "(hardnet resume JOB --out DEST rebuilds it)", job_id, e.split(" ")[0])
                continue
            chunk, count, digest = e.split(" ")
            task = ChunkTask(job_id=job_id, chunk=int(chunk), count=int(count), digest=digest,
                             model=f.model, dest=f.dest, options=f.options)
            sending = f"{job_id} {e}"
            taken = time.time()
            self.store.r.zadd(skey, {sending: taken})
            try:
                self.app.send_task(TASK_CLASSIFY, args=[task.model_dump(exclude_none=True)],
                                   queue=queue, producer=producer)
            except Exception:
                self.ready.put_back(job_id, queue, f.priority, e)
                self.store.r.zrem(skey, sending)
                raise
            self.store.r.zrem(skey, sending)
            if time.time() - taken > SLOW_S:
                # meanwhile other dispatchers published later chunks of the job: order is per
                # dispatcher, and this one was slow (a starved thread, a reconnect)
                log.warning("job %s: chunk %s took %.1fs from its turn to the queue", job_id, chunk,
                            time.time() - taken)
            moved += 1
            want -= 1
        return moved

    def recover(self, queue: str, older_than_s: float = RECOVER_S) -> int:
        """Push back the chunks a dispatcher took and did not publish (it died in between): each
        goes to the head of its job's ready list. One that was published after all is sent twice
        (a duplicate delivery is acknowledged without work). Returns how many were pushed back."""
        r, skey = self.store.r, sending_key(queue)
        n = 0
        for member in r.zrangebyscore(skey, 0, time.time() - older_than_s, start=0, num=100):
            if not r.zrem(skey, member):
                continue                 # another dispatcher recovers it
            job_id, e = member.split(" ", 1)
            f = self._fields(job_id)
            self.ready.put_back(job_id, queue, f.priority if f else None, e)
            log.warning("job %s: chunk %s was taken by a dispatcher that stopped before sending it; "
                        "sent again", job_id, e.split(" ")[0])
            n += 1
        return n


def ready_lists(store: JobStore) -> ReadyLists:
    """The store's ReadyLists (made once per JobStore: its scripts are registered once)."""
    rl = store.__dict__.get("_ready_lists")
    if rl is None:
        rl = store.__dict__["_ready_lists"] = ReadyLists(store)
    return rl


def reactivate(store: JobStore, job_id: str, h: dict) -> bool:
    """Put a live job with ready chunks back in its queue's turn (a dispatcher died holding it).
    True when it had to be put back."""
    queue = h.get("queue") or "hardnet"
    r = store.r
    if r.zscore(active_key(queue), job_id) is not None or not r.llen(store.key(job_id, "ready")):
        return False
    r.zadd(active_key(queue), {job_id: _score(h.get("priority"), time.time())}, nx=True)
    return True


__all__ = ["PRIORITIES", "DEFAULT_PRIORITY", "ReadyLists", "ready_lists", "Dispatcher", "reactivate", "active_key",
           "priority_rank"]
