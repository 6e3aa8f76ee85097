"""Logging for both sides: credentials redacted from every line, and ``HARDNET_LOG_FORMAT=json``
for log pipelines (one JSON object per line: time, level, logger, message, worker, job, chunk).

A chunk's task sets the job and chunk for its thread (:func:`chunk_context`); lines logged there
carry them. The engine's stage threads serve several chunks at once and log without them.

:func:`redact` is for text (log lines, error messages): every ``user:password@`` of a URL and every
credential query parameter (``X-Amz-Signature=``, ``sig=``, ``token=``...) anywhere in it becomes ``***``.

:func:`redact_uri` is what a record's URI passes through (``ResultRecord.uri``): a URI must stay
the object's exact name, so only what is a credential *in that kind of URI* goes. An ``http(s)://``
URL loses the password of its userinfo and the values of credential parameters in its query (and
fragment), nothing in its path; an ``s3://`` URI and a local path or ``file://`` URI are returned
as they are (``s3://b/x&token=5/a.jpg`` is a key, not a token); a URI of any other scheme is
redacted like text.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
from datetime import datetime, timezone

#: query parameters that carry a credential: AWS SigV4 / SigV2 presigned URLs, GCS signed URLs,
#: Azure SAS, and the usual token names
_SECRET_PARAMS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature", "AWSAccessKeyId",
    "x-amz-security-token", "X-Goog-Signature", "X-Goog-Credential", "sig", "sv_sig", "token",
    "access_token", "api_key", "apikey", "password", "secret",
)
_PARAM_RE = re.compile(
    r"(?i)([?&](?:" + "|".join(re.escape(p) for p in _SECRET_PARAMS) + r")=)[^&#\s\"'<>]*")
# scheme://user:password@host -> scheme://user:***@host (user alone is kept: it names no secret)
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@\"'<>]*):[^/\s@\"'<>]*@")
_REDACTED = "***"
_SECRET_NAMES = frozenset(p.lower() for p in _SECRET_PARAMS)
_URI_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def redact(text: str) -> str:
    """``text`` with URL passwords and credential query parameters replaced by ***."""
    # Each pattern needs its marker ("=" of a parameter, "@" after a URL's userinfo): most URIs
    # have neither, and every record's URI passes through here.
    if "=" not in text and ("@" not in text or "://" not in text):
        return text
    text = _USERINFO_RE.sub(lambda m: f"{m.group(1)}:{_REDACTED}@", text)
    return _PARAM_RE.sub(lambda m: m.group(1) + _REDACTED, text)


def _redact_params(part: str) -> str:
    """``a=1&sig=x`` -> ``a=1&sig=***`` (the names in _SECRET_PARAMS, any case)."""
    items = part.split("&")
    for i, item in enumerate(items):
        name, eq, _ = item.partition("=")
        if eq and name.lower() in _SECRET_NAMES:
            items[i] = f"{name}={_REDACTED}"
    return "&".join(items)


def _redact_http(uri: str) -> str:
    scheme_end = uri.index("://") + 3
    rest = uri[scheme_end:]
    cut = len(rest)
    for ch in "/?#":
        j = rest.find(ch)
        if j != -1:
            cut = min(cut, j)
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        userinfo, _, hostport = authority.rpartition("@")
        if ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:{_REDACTED}@{hostport}"
    if "=" in tail:
        before, hash_, fragment = tail.partition("#")
        path, qmark, query = before.partition("?")
        tail = (path + qmark + (_redact_params(query) if qmark else "")
                + hash_ + (_redact_params(fragment) if hash_ else ""))
    return uri[:scheme_end] + authority + tail


def redact_uri(uri: str) -> str:
    """A record's URI with only its credentials replaced by ***: the password of an http(s) URL's
    userinfo and credential parameters of its query or fragment. ``s3://`` URIs (the raw key,
    hnq.uris), local paths and ``file://`` URIs come back unchanged; other schemes as :func:`redact`."""
    m = _URI_SCHEME_RE.match(uri)
    if m is None:
        return uri                                  # a plain local path
    scheme = m.group(1).lower()
    if scheme in ("s3", "file"):
        return uri
    if scheme in ("http", "https") and uri[m.end():m.end() + 2] == "//":
        if "=" not in uri and "@" not in uri:
            return uri
        return _redact_http(uri)
    if len(scheme) == 1:
        return uri                                  # a Windows-style drive letter: a path
    return redact(uri)


def has_credentials(uri: str) -> bool:
    """Whether a record of ``uri`` would hide part of it (:func:`redact_uri`): a password or a
    credential parameter in an http(s) URL."""
    return ("=" in uri or "@" in uri) and redact_uri(uri) != uri


_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("hardnet_job", default=None)
_chunk: contextvars.ContextVar[int | None] = contextvars.ContextVar("hardnet_chunk", default=None)
_worker = {"name": None}


def set_worker(name: str | None) -> None:
    """The worker's node name (Celery hostname), put on every JSON line of this process."""
    _worker["name"] = name


@contextlib.contextmanager
def chunk_context(job: str, chunk: int):
    """Lines logged in this thread inside the block name the job and chunk."""
    tj, tc = _job.set(job), _chunk.set(chunk)
    try:
        yield
    finally:
        _job.reset(tj)
        _chunk.reset(tc)


class RedactingFilter(logging.Filter):
    """Formats the message once, redacted, so that no handler sees the credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad %-format: leave it to logging's own error path
            return True
        clean = redact(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if _worker["name"]:
            out["worker"] = _worker["name"]
        job, chunk = getattr(record, "job", None) or _job.get(), getattr(record, "chunk", None)
        if chunk is None:
            chunk = _chunk.get()
        if job:
            out["job"] = job
        if chunk is not None:
            out["chunk"] = chunk
        if record.threadName and record.threadName != "MainThread":
            out["thread"] = record.threadName
        if record.exc_info:
            out["exc"] = record.exc_text or redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def install(logger: logging.Logger, fmt: str, *, text_format: str | None = None) -> None:
    """Give every handler of ``logger`` the redaction filter and, for ``fmt='json'``, the JSON
    formatter (``text_format``: the format string of text mode; None keeps the handler's)."""
    for h in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
        if fmt == "json":
            h.setFormatter(JsonFormatter())
        elif text_format:
            h.setFormatter(logging.Formatter(text_format))


def setup_cli(level: int, fmt: str) -> None:
    """The CLI's logging: stderr, redacted, text or JSON."""
    logging.basicConfig(level=level, format=TEXT_FORMAT)
    install(logging.getLogger(), fmt)


__all__ = ["redact", "redact_uri", "has_credentials", "chunk_context", "set_worker", "install", "setup_cli", "JsonFormatter",
           "RedactingFilter"]
