"""Hardening of kombu's Redis transport for workers.

kombu parses each message envelope popped from the queue with ``json.loads`` inside the consumer
loop; a non-JSON (or malformed) item pushed straight into the Redis list by anyone with write
access raised out of that loop and took the worker down (seen in
tests/integration/test_reliability.py::test_pickled_message_is_rejected_unread). The item has
already been popped by then, so the safe thing is to log it and go on: it is not ours."""
from __future__ import annotations

import logging

from kombu.transport import redis as kredis

log = logging.getLogger("hardnet.worker")


class SafeChannel(kredis.Channel):
    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (kredis.Empty, *self.connection_errors):
            raise
        except Exception as e:  # noqa: BLE001
            log.error("dropped a queue item that is not a valid message envelope (%s: %s)",
                      type(e).__name__, str(e)[:200])
            return True


def install() -> None:
    """Make every redis:// and rediss:// connection of this process use :class:`SafeChannel`."""
    kredis.Transport.Channel = SafeChannel
