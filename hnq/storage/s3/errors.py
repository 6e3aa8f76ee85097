"""What an S3 failure means for us: one place that turns botocore's exceptions (and the error
codes of S3's answers) into :class:`~hnq.errors.ImageError` / :class:`~hnq.errors.TransientError`
/ :class:`~hnq.errors.ConfigError`, for each kind of call.

* A **GET of one image** (:func:`classify_s3_error`, :func:`map_fetch_error`; both GET clients use
  them): NoSuchKey/NoSuchBucket/404 -> ``not_found``; InvalidObjectState (an archived object that
  was not restored) -> ``archived``; AccessDenied/403 -> ``access_denied``; throttling, 5xx,
  connection trouble and timeouts that outlive boto's retries -> :class:`TransientError` (the
  chunk is retried, the image gets no permanent record) whose code says which: ``throttled``
  (SlowDown, 503, 429, Throttling...), ``timeout`` (connect / read timeouts, RequestTimeout) or
  ``fetch_error`` (the rest); credential problems (expired token, unknown key id, bad signature,
  none found) -> TransientError ``fetch_error`` too, since they concern every image, not this one.
* A **listing** (:func:`listing_error`): a missing bucket, no access, bad or no credentials, an
  unreachable endpoint -> ConfigError (the user must fix something); S3 still failing -> TransientError.
* A **destination** read or write (:func:`destination_error`) and the **bucket check** before a
  submit (:func:`bucket_error`).
"""
from __future__ import annotations

import socket

import botocore.exceptions as bex

from hnq.errors import ConfigError, ErrorCode, ImageError, TransientError

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem", "InvalidObjectState",
           "Forbidden"}
_CREDENTIALS = {"ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                "TokenRefreshRequired", "RequestTimeTooSkewed", "ExpiredTokenException"}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "OperationAborted", "RequestTimeTooSkewed"}
# "slow down" answers: their TransientError gets the code ``throttled``
_THROTTLE_CODES = {"SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException",
                   "RequestLimitExceeded", "TooManyRequests", "RequestThrottled",
                   "ThrottledException", "BandwidthLimitExceeded"}
_THROTTLE_STATUS = {429, 503}
_TIMEOUT_CODES = {"RequestTimeout"}
#: failures of the transport itself (after boto's own retries) or while streaming a body
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError, bex.ResponseStreamingError,
    bex.ReadTimeoutError, bex.ConnectTimeoutError, OSError,
)
# the transport errors that are timeouts (TransientError code ``timeout``)
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    bex.ReadTimeoutError, bex.ConnectTimeoutError, socket.timeout, TimeoutError,
)
try:  # urllib3 errors can leak out of StreamingBody.read
    import urllib3.exceptions as _u3

    TRANSPORT_ERRORS = TRANSPORT_ERRORS + (_u3.HTTPError,)
    _TIMEOUT_ERRORS = _TIMEOUT_ERRORS + (_u3.TimeoutError,)
except ImportError:  # pragma: no cover
    pass


def code_and_status(e: bex.ClientError) -> tuple[str, int]:
    """The error code of S3's answer (may be empty) and its HTTP status (0 if unknown)."""
    err = e.response.get("Error", {}) or {}
    code = str(err.get("Code", "") or "")
    status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(code: str, status: int) -> bool:
    return code in _TRANSIENT_CODES or status >= 500 or status == 429


def transient_code(code: str, status: int) -> ErrorCode:
    """The code of the TransientError for an S3 error answer that outlived the retries."""
    if code in _THROTTLE_CODES or status in _THROTTLE_STATUS:
        return ErrorCode.throttled
    if code in _TIMEOUT_CODES:
        return ErrorCode.timeout
    return ErrorCode.fetch_error


def transport_code(e: BaseException) -> ErrorCode:
    """``timeout`` for a connect / read timeout, else ``fetch_error``."""
    return ErrorCode.timeout if isinstance(e, _TIMEOUT_ERRORS) else ErrorCode.fetch_error


def describe(e: BaseException) -> str:
    """``Type: message`` of an exception, for error messages."""
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- a GET of one image

def classify_s3_error(uri: str, code: str, status: int) -> Exception:
    """The ImageError / TransientError for an S3 error answer (error ``code`` of the XML body, may
    be empty; HTTP ``status``, 0 if unknown) to a GET of ``uri``. Both GET clients use it."""
    if code in _NOT_FOUND or status == 404:
        what = "bucket does not exist" if code == "NoSuchBucket" else "no such object"
        return ImageError(f"{uri}: {what}", ErrorCode.not_found)
    if code in _CREDENTIALS:
        return TransientError(f"{uri}: S3 refused our credentials ({code}); check the worker's "
                              "AWS credentials", ErrorCode.fetch_error)
    if code == "InvalidObjectState":
        return ImageError(f"{uri}: the object is archived (InvalidObjectState: a Glacier / Deep "
                          "Archive object, or an Intelligent-Tiering archive tier); restore it first",
                          ErrorCode.archived)
    if code in _DENIED or status == 403:
        return ImageError(f"{uri}: access denied ({code or status})", ErrorCode.access_denied)
    if code in ("InvalidBucketName", "KeyTooLongError", "InvalidURI"):
        return ImageError(f"{uri}: {code}", ErrorCode.invalid_uri)
    if _is_transient(code, status):
        return TransientError(f"{uri}: S3 kept failing after retries ({code or status})",
                              transient_code(code, status))
    return ImageError(f"{uri}: S3 error {code or status}", ErrorCode.fetch_error)


def map_fetch_error(e: BaseException, uri: str) -> Exception:
    """The ImageError / TransientError for an exception raised while reading ``uri``."""
    if isinstance(e, bex.ClientError):
        code, status = code_and_status(e)
        return classify_s3_error(uri, code, status)
    if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError,
                      bex.CredentialRetrievalError)):
        return TransientError(f"{uri}: no usable AWS credentials ({type(e).__name__})",
                              ErrorCode.fetch_error)
    if isinstance(e, bex.ParamValidationError):
        return ImageError(f"{uri}: {e}", ErrorCode.invalid_uri)
    if isinstance(e, TRANSPORT_ERRORS) or isinstance(e, bex.BotoCoreError):
        return TransientError(f"{uri}: S3 transport error after retries ({describe(e)})",
                              transport_code(e))
    return ImageError(f"{uri}: {describe(e)}", ErrorCode.internal_error)


# ---------------------------------------------------------------- listing, destination, bucket

def listing_error(e: BaseException, bucket: str, prefix: str) -> Exception:
    """The ConfigError / TransientError for an exception raised while listing (or reading the
    producer's own inputs under) ``s3://bucket/prefix``."""
    where = f"s3://{bucket}/{prefix}"
    if isinstance(e, bex.ClientError):
        code, status = code_and_status(e)
        if code == "NoSuchBucket" or status == 404:
            return ConfigError(f"{where}: bucket {bucket!r} does not exist")
        if code in _DENIED or status == 403:
            return ConfigError(f"{where}: access denied listing the bucket ({code or status})")
        if code in _CREDENTIALS:
            return ConfigError(f"{where}: S3 refused our credentials ({code})")
        if _is_transient(code, status):
            return TransientError(f"{where}: S3 kept failing while listing ({code or status})")
        return ConfigError(f"{where}: S3 error while listing ({code or status})")
    if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return ConfigError(f"{where}: no AWS credentials found")
    if isinstance(e, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        return ConfigError(f"{where}: cannot reach the S3 endpoint ({e})")
    return TransientError(f"{where}: listing failed ({describe(e)})")


def destination_error(e: BaseException, where: str) -> Exception:
    """The ConfigError / TransientError for an exception raised while writing (or reading back)
    results at ``where``."""
    if isinstance(e, bex.ClientError):
        code, status = code_and_status(e)
        if code == "NoSuchBucket":
            return ConfigError(f"{where}: bucket does not exist")
        if code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired",
                    "RequestTimeTooSkewed"):
            return TransientError(f"{where}: S3 refused our credentials ({code})")
        if code in _DENIED or code in _CREDENTIALS or status == 403:
            return ConfigError(f"{where}: access denied writing results ({code or status}); "
                               "check the worker's AWS credentials and bucket policy")
        return TransientError(f"{where}: S3 write failed ({code or status})")
    if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return ConfigError(f"{where}: no AWS credentials found")
    return TransientError(f"{where}: S3 write failed ({describe(e)})")


def bucket_error(e: BaseException, bucket: str, where: str) -> ConfigError:
    """The ConfigError for an exception raised by the HeadBucket that checks a destination."""
    if isinstance(e, bex.ClientError):
        code, status = code_and_status(e)
        if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
            return ConfigError(f"{where}: bucket {bucket!r} does not exist")
        if status == 403 or code in _DENIED:
            return ConfigError(f"{where}: access denied to bucket {bucket!r}")
        return ConfigError(f"{where}: cannot use bucket {bucket!r} ({code or status})")
    return ConfigError(f"{where}: cannot reach S3 ({describe(e)})")
