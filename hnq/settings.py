"""Settings shared by both sides. Each side has one settings class (``producer.settings``,
``worker.settings``) built on :class:`CommonSettings`; every field is documented and read from the
environment with the ``HARDNET_`` prefix. Values are passed down explicitly, never read from the
environment deep inside the code."""
from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

from hnq.errors import ConfigError
from hnq.logs import redact
from hnq.models import MODELS
from hnq.redis_conn import SentinelOptions, celery_sentinel_options, is_sentinel, parse_sentinel

#: The Celery queue, which on Redis is a list of this name in the broker DB (KEDA watches it).
QUEUE = "hardnet"
TASK_CLASSIFY = "hardnet.classify_chunk"
TASK_FINALIZE = "hardnet.finalize_job"


def _shown(value) -> str:
    """A bad value as the error shows it: URLs without their password (with or without a
    scheme), long values cut."""
    if isinstance(value, str) and "://" in value:
        text = repr(redact_url(value))
    elif isinstance(value, str) and "@" in value:      # user:password@host without a scheme
        text = repr(redact_url("x://" + value)[4:])
    else:
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _message(x: dict) -> str:
    """pydantic's message of one error, without the "Value error, " of our own validators."""
    msg = x["msg"]
    return msg[len("Value error, "):] if x.get("type") == "value_error" and msg.startswith("Value error, ") else msg


class ClearErrors(BaseSettings):
    """Settings whose bad values raise a ConfigError that names the environment variable, one
    line per bad variable (`bad setting: HARDNET_CHUNK_SIZE='abc': Input should be a valid
    integer`), not a pydantic traceback."""

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as e:
            prefix = self.model_config.get("env_prefix", "")
            lines = []
            for x in e.errors():
                field = str(x["loc"][0]) if x["loc"] else "?"
                line = f"bad setting: {prefix}{field.upper()}={_shown(x.get('input'))}: {_message(x)}"
                if line not in lines:
                    lines.append(line)
            raise ConfigError("\n".join(lines)) from None


def check_model(name: str) -> str:
    """A model setting (``HARDNET_MODEL``): one of the registry's variants."""
    if name not in MODELS:
        raise ValueError(f"unknown model, choose {', '.join(MODELS)}")
    return name


#: the type of a model setting: checked against the registry when the settings are read
ModelSetting = Annotated[str, AfterValidator(check_model)]

#: host[:port] given without a scheme (``127.0.0.1:6390``): the URL it meant is suggested
_HOST_PORT_RE = re.compile(r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")


def check_broker_url(url: str) -> str:
    """``HARDNET_BROKER_URL``: a ``redis://`` or ``rediss://`` URL that redis-py and Celery both
    read, checked when the settings are read, so that a wrong shape is a one-line configuration
    error (exit 2), not a traceback from the first connection. Whether Redis answers there is
    found out by connecting (exit 1 when it does not)."""
    url = url.strip()
    if not url:
        raise ValueError("empty: give a Redis URL such as redis://localhost:6379/0")
    if "://" not in url:
        meant = f"redis://{url}/0" if _HOST_PORT_RE.fullmatch(url) else "redis://HOST:6379/0"
        raise ValueError(f"not a URL (no scheme): give a Redis URL such as {meant} "
                         "(rediss:// for TLS)")
    scheme = url.split("://", 1)[0].lower()
    if is_sentinel(url):        # kombu's Sentinel syntax (hnq.redis_conn), with HARDNET_SENTINEL_MASTER
        try:
            parse_sentinel(url)
        except ValueError as e:
            raise ValueError(f"not a valid Sentinel URL: {redact(str(e))}") from None
        return url
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"{scheme}:// is not Redis: give redis://HOST:PORT/DB (rediss:// for TLS, "
                         "sentinel://H1:26379;sentinel://H2:26379 for Sentinel)")
    try:
        parse_url(url)
        parts = urlsplit(url)
        parts.port           # noqa: B018 -- raises on a port that is not a number
    except ValueError as e:
        raise ValueError(f"not a valid Redis URL: {redact(str(e))}") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number: give redis://HOST:PORT/DB, e.g. /0")
    return url


class CommonSettings(ClearErrors):
    model_config = SettingsConfigDict(env_prefix="HARDNET_", extra="ignore")

    broker_url: Annotated[str, AfterValidator(check_broker_url)] = Field(
        "redis://localhost:6379/0",
        description="Redis URL of the broker and of the job state. `redis://:PASSWORD@host:6379/0` "
        "for a password, `rediss://…?ssl_cert_reqs=required` for TLS.",
    )
    queue: str = Field(QUEUE, description="Celery queue (= Redis list) that chunks go through.")
    dispatch_ahead: int = Field(
        4, ge=1, le=1000, description="Chunk messages kept in the Celery queue; the rest wait in "
        "their job's ready list and are moved in by priority and in turn between jobs (fair share, "
        "docs/operations.md). Larger = fewer waits for the dispatcher with many workers, but a new "
        "job starts after that many more chunks.")
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
    task_events: bool = Field(
        False, description="Send Celery task events (received/started/succeeded/failed, and "
        "task-sent from `submit`), so that Flower and `celery events` show tasks. Costs a few "
        "small Redis messages per chunk. `hardnet worker -E` turns on a worker's alone.")
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line (time, level, logger, worker, "
        "job, chunk, message) for log pipelines; `text`: for people. Credentials are redacted in "
        "both.")
    sentinel_master: str | None = Field(
        None, validate_default=True,
        description="Redis Sentinel: the master's name (`sentinel monitor NAME ...`), required when "
        "HARDNET_BROKER_URL is `sentinel://H1:26379;sentinel://H2:26379;...` (kombu's syntax; the "
        "first part's password and /DB are the master's). Celery, the job store and the CLI all "
        "follow the master through the sentinels.")
    sentinel_password: str | None = Field(
        None, description="Redis Sentinel: the sentinels' own password (`requirepass` in "
        "sentinel.conf; kombu's sentinel_kwargs). The master's password goes in the URL.")
    sentinel_tls: bool = Field(
        False, description="Redis Sentinel: TLS to the master and to the sentinels, checked against "
        "the system's CA certificates (SSL_CERT_FILE for another bundle).")

    @field_validator("sentinel_master")
    @classmethod
    def _master_with_sentinel(cls, v: str | None, info: ValidationInfo) -> str | None:
        url = info.data.get("broker_url") or ""
        if is_sentinel(url) and not (v or "").strip():
            raise ValueError("a sentinel:// HARDNET_BROKER_URL needs the master's name here "
                             "(as in `sentinel monitor NAME HOST PORT QUORUM`)")
        return (v or "").strip() or None

    def sentinel(self) -> SentinelOptions | None:
        """How to reach the master behind a sentinel:// broker URL (None for redis://)."""
        if not is_sentinel(self.broker_url):
            return None
        return SentinelOptions(self.sentinel_master or "", self.sentinel_password, self.sentinel_tls)


class S3Settings(ClearErrors):
    """How we talk to S3, beyond what boto3's own chain reads (credentials, profile, region,
    ``AWS_ENDPOINT_URL``). Both sides, both GET clients (boto3 and obstore)."""

    model_config = SettingsConfigDict(env_prefix="HARDNET_S3_", extra="ignore")

    retry_mode: Literal["standard", "adaptive", "legacy"] = Field(
        "standard", description="botocore retry mode of S3 calls.")
    max_attempts: int = Field(
        8, ge=1, le=100, description="Requests per S3 call in all, the first included (as "
        "AWS_MAX_ATTEMPTS counts them).")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to connect to S3.")
    read_timeout: float = Field(60.0, gt=0, description="Seconds without a byte from S3 before a read fails.")
    addressing_style: Literal["path", "virtual", "auto"] | None = Field(
        None, description="`path` or `virtual` bucket addressing; unset: boto3's choice.")


def redact_url(url: str) -> str:
    """A URL fit for logs and messages: the password (and any credential parameter) as ***."""
    return redact(url)


def celery_config(s: CommonSettings) -> dict:
    """The Celery configuration both sides use (the producer only sends, with the same transport)."""
    vt = s.visibility_timeout
    conf = dict(
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
        # Flower / `celery events` (HARDNET_TASK_EVENTS): the worker's task events, and task-sent
        # from the producer.
        worker_send_task_events=s.task_events,
        task_send_sent_event=s.task_events,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    # Sentinel (hnq.redis_conn): master_name and sentinel_kwargs join the transport options
    extra = celery_sentinel_options(s.broker_url, s.sentinel())
    conf["broker_transport_options"].update(extra.pop("transport_options", {}))
    conf.update(extra)
    return conf


def lean_messages(app) -> None:
    """Keep each task message small in Redis: no argsrepr/kwargsrepr copies of the arguments in the
    headers (they only feed monitoring tools, and would be truncated reprs anyway). A chunk message
    is then about 1.2 KB while queued (measured: benchmarks/bench_submit_scale.py)."""
    app.amqp.argsrepr_maxsize = 0
    app.amqp.kwargsrepr_maxsize = 0
