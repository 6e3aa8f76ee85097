"""kombu's Redis transport as the workers use it: hardened, and gated by chunk admission.

kombu parses each message envelope popped from the queue with ``json.loads`` inside the consumer
loop; a non-JSON (or malformed) item pushed straight into the Redis list by anyone with write
access raised out of that loop and took the worker down (seen in
tests/integration/test_reliability.py::test_pickled_message_is_rejected_unread). The item has
already been popped by then, so the safe thing is to log it and go on: it is not ours.

Admission: before each BRPOP the channel asks its QoS ``can_consume()`` (the prefetch limit); ours
also asks the worker's gate (worker/admission.py: enough images in flight already?).

Dispatch: before each BRPOP the channel wakes the worker's dispatcher (worker/dispatcher.py), which
tops the queue up from the jobs' ready lists (hnq.jobs.dispatch: fair share between jobs).

Both of kombu's Redis channels get these: the plain one (``redis://``, ``rediss://``) and the
Sentinel one (``sentinel://``: kombu's SentinelChannel subclasses the plain Channel, so patching only
``Transport.Channel`` would leave a Sentinel fleet without gate and guard)."""
from __future__ import annotations

import logging

from kombu.transport import redis as kredis

log = logging.getLogger("hardnet.worker")


#: worker.admission.Admission (or any callable -> bool) once installed; None = prefetch limit only
_gate = None
#: told the queues before each BRPOP (worker.dispatcher.wake: tops them up); None = nothing
_on_poll = None


class GatedQoS(kredis.QoS):
    def can_consume(self):
        return super().can_consume() and (_gate is None or _gate())

    def restore_unacked_once(self, stderr=None):
        """kombu's Redis channel drops its pool before this runs on close, and then builds one from
        the transport's connection info; when the broker connection was lost (a Sentinel failover:
        seen once in six runs of tests/integration/test_sentinel.py) that info can already be gone,
        and the AttributeError took the whole worker down ("Unrecoverable error"). The messages stay
        in Redis' unacked hash: any live worker restores them after the visibility timeout, and the
        sweeper re-sends their chunks sooner (hnq.jobs.sweep). So: say so, and let the worker
        reconnect."""
        try:
            return super().restore_unacked_once(stderr)
        except AttributeError as e:
            log.warning("could not put this worker's %d unacknowledged message(s) back at once (%s); "
                        "they come back after the visibility timeout, their chunks sooner through the "
                        "sweeper", len(self._delivered), e)


class _Hardened:
    """The admission gate, the dispatcher's wake-up and the malformed-message guard, for either of
    kombu's Redis channels."""
    QoS = GatedQoS

    def _brpop_start(self, timeout=None):
        if _on_poll is not None:
            try:
                _on_poll(tuple(self.active_queues))
            except Exception:  # noqa: BLE001 - a wake-up must never stop the consumer
                log.exception("dispatcher wake-up failed")
        return super()._brpop_start(timeout)

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (kredis.Empty, *self.connection_errors):
            raise
        except Exception as e:  # noqa: BLE001
            log.error("dropped a queue item that is not a valid message envelope (%s: %s)",
                      type(e).__name__, str(e)[:200])
            return True

    def _receive_one(self, c):
        """One pub/sub message (kombu calls this when the socket is readable), read WITHOUT
        blocking. kombu reads with redis-py's blocking ``parse_response()``: when the server went
        away (a Sentinel failover: the master was killed) the read fails, redis-py's retry
        reconnects the pub/sub connection to the new master at once, re-subscribes, and then
        blocks for the next broadcast, which may never come: the worker's whole event loop hung
        there (seen in tests/integration/test_sentinel.py, before this). Without blocking, the
        reconnected connection is simply read again when it has something."""
        return super()._receive_one(_NonBlockingPubSub(c))


class _NonBlockingPubSub:
    """A redis-py PubSub whose ``parse_response()`` does not block (see _Hardened._receive_one)."""

    def __init__(self, pubsub):
        self._pubsub = pubsub

    def parse_response(self, block=True, timeout=0):
        return self._pubsub.parse_response(block=False, timeout=0)

    def __getattr__(self, name):
        return getattr(self._pubsub, name)


class SafeChannel(_Hardened, kredis.Channel):
    """redis:// and rediss://"""


class SafeSentinelChannel(_Hardened, kredis.SentinelChannel):
    """sentinel:// (master_name and sentinel_kwargs from the transport options)"""


def install(gate=None, on_poll=None) -> None:
    """Make every redis:// and rediss:// connection of this process use :class:`SafeChannel`, and
    every sentinel:// one :class:`SafeSentinelChannel`; ``gate``: asked before each message is
    taken (never raising; see worker.admission); ``on_poll``: told the queues before each BRPOP
    (worker.dispatcher.wake)."""
    global _gate, _on_poll
    kredis.Transport.Channel = SafeChannel
    kredis.SentinelTransport.Channel = SafeSentinelChannel
    _gate = gate
    _on_poll = on_poll
