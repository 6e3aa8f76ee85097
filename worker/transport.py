"""kombu's Redis transport as the workers use it: hardened, and gated by chunk admission.

kombu parses each message envelope popped from the queue with ``json.loads`` inside the consumer
loop; a non-JSON (or malformed) item pushed straight into the Redis list by anyone with write
access raised out of that loop and took the worker down (seen in
tests/integration/test_reliability.py::test_pickled_message_is_rejected_unread). The item has
already been popped by then, so the safe thing is to log it and go on: it is not ours.

Admission: before each BRPOP the channel asks its QoS ``can_consume()`` (the prefetch limit); ours
also asks the worker's gate (worker/admission.py: enough images in flight already?)."""
from __future__ import annotations

import logging

from kombu.transport import redis as kredis

log = logging.getLogger("hardnet.worker")


#: worker.admission.Admission (or any callable -> bool) once installed; None = prefetch limit only
_gate = None


class GatedQoS(kredis.QoS):
    def can_consume(self):
        return super().can_consume() and (_gate is None or _gate())


class SafeChannel(kredis.Channel):
    QoS = GatedQoS

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (kredis.Empty, *self.connection_errors):
            raise
        except Exception as e:  # noqa: BLE001
            log.error("dropped a queue item that is not a valid message envelope (%s: %s)",
                      type(e).__name__, str(e)[:200])
            return True


def install(gate=None) -> None:
    """Make every redis:// and rediss:// connection of this process use :class:`SafeChannel`;
    ``gate``: asked before each message is taken (never raising; see worker.admission)."""
    global _gate
    kredis.Transport.Channel = SafeChannel
    _gate = gate
