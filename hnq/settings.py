"""Settings shared by both sides. Each side has one settings class (``producer.settings``,
``worker.settings``) built on :class:`CommonSettings`; every field is documented and read from the
environment with the ``HARDNET_`` prefix. Values are passed down explicitly, never read from the
environment deep inside the code."""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The Celery queue, which on Redis is a list of this name in the broker DB (KEDA watches it).
QUEUE = "hardnet"
TASK_CLASSIFY = "hardnet.classify_chunk"
TASK_FINALIZE = "hardnet.finalize_job"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HARDNET_", extra="ignore")

    broker_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis URL of the broker and of the job state. `redis://:PASSWORD@host:6379/0` "
        "for a password, `rediss://…?ssl_cert_reqs=required` for TLS.",
    )
    queue: str = Field(QUEUE, description="Celery queue (= Redis list) that chunks go through.")
    visibility_timeout: int = Field(
        3600, ge=2,
        description="Seconds after which a chunk taken by a worker that died is given to another "
        "worker. Must exceed the longest chunk, or a slow chunk runs twice at once (harmless, "
        "outputs are deterministic, but wasteful).",
    )
    max_attempts: int = Field(
        5, ge=1, description="Deliveries of one chunk before it goes to the dead-letter list.")
    results_ttl_days: int = Field(
        14, ge=1, description="Days that job state and Redis-destination results are kept.")


def redact_url(url: str) -> str:
    """A URL fit for logs and messages: the password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    if u.password is None:
        return url
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return urlunsplit(u._replace(netloc=f"{u.username or ''}:***@{host}"))


def celery_config(s: CommonSettings) -> dict:
    """The Celery configuration both sides use (the producer only sends, with the same transport)."""
    vt = s.visibility_timeout
    return dict(
        broker_url=s.broker_url,
        # JSON only: a pickled message pushed into the queue is rejected unread.
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Results go to DEST and counters to Redis, never to a Celery result backend.
        task_ignore_result=True,
        # At-least-once: ack after the chunk is written; a worker killed mid-chunk leaves the
        # message unacked and kombu restores it after the visibility timeout.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=s.queue,
        task_queues=None,
        broker_transport_options={
            "visibility_timeout": vt,
            # kombu scans for expired unacked messages every interval*throttle seconds (100 s by
            # default); make the scan follow the visibility timeout instead.
            "unacked_restore_interval": max(1, min(10, vt // 5)),
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            "retry_on_timeout": True,
            "health_check_interval": 10,
        },
        # A producer publishing while Redis restarts waits for it instead of failing the submit.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 60, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 5},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # reconnect forever, with Celery's backoff
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )


def lean_messages(app) -> None:
    """Keep each task message small in Redis: no argsrepr/kwargsrepr copies of the arguments in the
    headers (they only feed monitoring tools, and would be truncated reprs anyway). A chunk message
    is then about 1.2 KB while queued (measured: benchmarks/bench_submit_scale.py)."""
    app.amqp.argsrepr_maxsize = 0
    app.amqp.kwargsrepr_maxsize = 0
