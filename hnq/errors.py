"""Stable error codes. A code is part of the public record format: never rename one."""
from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    # --- about one image: the record carries it, the rest of the chunk goes on ---
    not_found = "not_found"                    # the object / file does not exist
    access_denied = "access_denied"            # storage refused us (403, EACCES)
    decode_error = "decode_error"              # bytes are not an image PIL can decode (or truncated)
    too_large = "too_large"                    # over the download size cap or the decoded-pixel cap
    empty = "empty"                            # zero bytes
    archived = "archived"                      # in an archive storage class (Glacier, Deep Archive): restore it first
    unsupported_scheme = "unsupported_scheme"  # e.g. ftp://, or http(s):// when not enabled
    invalid_uri = "invalid_uri"                # malformed URI
    forbidden = "forbidden"                    # host not allowed / path outside the allowed roots
    timeout = "timeout"                        # a network call ran past its timeout
    fetch_error = "fetch_error"                # storage kept failing after retries
    throttled = "throttled"                    # storage kept answering "slow down" (503, 429) after retries
    internal_error = "internal_error"          # a bug: the message says what
    # --- `submit --tag`: in a record's ``tag_error`` (its labels stand, status stays ok) ---
    tag_error = "tag_error"                    # the labels could not be written as S3 object tags
    # --- about a whole chunk: every URI of it gets this record when it is dead-lettered ---
    chunk_failed = "chunk_failed"
    cancelled = "cancelled"


class HardnetError(Exception):
    """Base class of every error we raise on purpose; ``code`` is an :class:`ErrorCode`."""

    code: ErrorCode = ErrorCode.internal_error

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)

    @property
    def message(self) -> str:
        return str(self)


class ImageError(HardnetError):
    """One input image could not be labelled; becomes an ``error`` record, never a chunk failure."""


class TransientError(HardnetError):
    """Storage or broker hiccup worth retrying (503 SlowDown, connection reset, timeout).

    ``code`` says which kind, so that a caller that gives up on the image can record it with a
    stable code: ``throttled`` (SlowDown, 503, 429, Throttling...), ``timeout`` (connect / read
    timeouts) or ``fetch_error`` (resets, 500s, broken bodies, credential trouble, the rest)."""

    code = ErrorCode.fetch_error


class ConfigError(HardnetError):
    """Bad configuration or arguments: reported to the user, not retried."""
