"""Reaching the job store from the command line: the producer's settings, and a JobStore once
Redis has answered. Every command that talks to Redis (the job commands, the progress display,
`hardnet report`) starts here."""
from __future__ import annotations

import redis

from hnq.console import BrokerUnreachable
from hnq.jobs.store import JobStore
from producer.settings import ProducerSettings


def settings() -> ProducerSettings:
    return ProducerSettings()


def job_store(s: ProducerSettings) -> JobStore:
    """The job store, once Redis has answered (within about 8 s, or BrokerUnreachable). After that
    first contact the store rides out a Redis restart with its long backoff (`--wait`)."""
    st = JobStore.from_settings(s)
    try:
        st.ping_fast(8.0)
    except redis.AuthenticationError:
        raise
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise BrokerUnreachable(str(e)) from None
    return st
