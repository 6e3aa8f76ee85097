"""http(s) fetch with SSRF protection.

Order of checks for the URL and for every redirect hop (at most :data:`MAX_REDIRECTS`):
http enabled -> scheme http/https -> host on the allowlist -> every resolved address public
(unless private networks are allowed) -> connect to one of those vetted addresses (no second DNS
lookup; TLS still verifies the certificate against the host name). No proxy from the
environment is used. Redirects to other schemes (``file:``, ``s3:``...) are refused.

Errors: 404/410 -> ``not_found``; 401/403/451 -> ``access_denied``; over the size cap ->
``too_large``; socket timeout or the overall ``timeout_s`` deadline passed -> ``timeout``;
408/425/429/5xx and connection refused/reset, retried :data:`ATTEMPTS` times -> TransientError
(code ``throttled`` when the last answer was 429 or 503, else ``fetch_error``);
other statuses, TLS certificate failures, too many redirects -> ``fetch_error``.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
import urllib.parse

from hnq.errors import ErrorCode, ImageError, TransientError
import hnq.storage.netguard as netguard  # the module, not the package: no circle via hnq.storage
from hnq.storage.base import Fetched, FetchPolicy, clean_etag, read_capped, too_large
from hnq.uris import parse_http

MAX_REDIRECTS = 5
ATTEMPTS = 3
USER_AGENT = "hardnet-queue/0.1 (+image labelling)"
_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_SAFE_PATH = "/%:@!$&'()*+,;=-._~"


class _Retry(Exception):
    """A transient failure of one attempt (``status``: the HTTP status, 0 for a broken
    connection)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


_THROTTLE_STATUS = {429, 503}


def _open_socket(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """Connect to the first vetted address that answers. Tests replace this function."""
    last: OSError | None = None
    for addr in addresses:
        try:
            return socket.create_connection((addr, port), timeout=timeout)
        except OSError as e:
            last = e
    assert last is not None
    raise last


def _check_hop(url: str, policy: FetchPolicy) -> tuple[urllib.parse.SplitResult, int, list[str]]:
    parts = parse_http(url)  # InvalidURI (invalid_uri) on a malformed hop
    host = parts.hostname or ""
    if not policy.http_allow_hosts:
        raise ImageError(f"{url}: no http host is allowed (set HARDNET_HTTP_ALLOW_HOSTS, e.g. "
                         "'images.example.com,*.cdn.example.com')", ErrorCode.forbidden)
    if not netguard.host_allowed(host, policy.http_allow_hosts):
        raise ImageError(f"{url}: host {host!r} is not in HARDNET_HTTP_ALLOW_HOSTS",
                         ErrorCode.forbidden)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    addresses = netguard.vet_addresses(host, netguard.resolve(host, port, policy.timeout_s),
                                       policy.allow_private_networks)
    return parts, port, addresses


def _request_target(parts: urllib.parse.SplitResult) -> str:
    path = urllib.parse.quote(parts.path or "/", safe=_SAFE_PATH)
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe=_SAFE_PATH + "?/")
    return path


def _one_hop(url: str, policy: FetchPolicy, deadline: float):
    """(status, response, connection) of one GET. The caller closes the connection."""
    parts, port, addresses = _check_hop(url, policy)
    remaining = max(0.05, deadline - time.monotonic())
    timeout = min(policy.timeout_s, remaining)
    host = parts.hostname or ""
    if parts.scheme.lower() == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn._create_connection = (  # type: ignore[attr-defined]
        lambda _address, t=timeout, _src=None: _open_socket(addresses, port, t))
    conn.request("GET", _request_target(parts), headers={
        "User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"})
    resp = conn.getresponse()
    return resp.status, resp, conn


def _attempt(uri: str, policy: FetchPolicy, deadline: float, on_size=None) -> Fetched:
    url = uri
    for _hop in range(MAX_REDIRECTS + 1):
        status, resp, conn = _one_hop(url, policy, deadline)
        try:
            if status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise ImageError(f"{uri}: HTTP {status} without a Location", ErrorCode.fetch_error)
                nxt = urllib.parse.urljoin(url, location.strip())
                scheme = urllib.parse.urlsplit(nxt).scheme.lower()
                if scheme not in ("http", "https"):
                    raise ImageError(f"{uri}: redirect to a {scheme or 'relative'}: URL refused",
                                     ErrorCode.forbidden)
                url = nxt
                continue
            if 200 <= status < 300:
                length = resp.getheader("Content-Length")
                size = int(length) if length and length.strip().isdigit() else None
                if size is not None and size > policy.max_bytes:
                    raise too_large(uri, size, policy.max_bytes)
                if on_size is not None:
                    on_size(size)     # None: no Content-Length (chunked)

                def tick() -> None:
                    if time.monotonic() > deadline:
                        raise ImageError(f"{uri}: download took longer than {policy.timeout_s}s",
                                         ErrorCode.timeout)

                data = read_capped(resp.read, policy.max_bytes, uri, tick=tick, block=1 << 16)
                return Fetched(data=data, etag=clean_etag(resp.getheader("ETag")), size=len(data))
            if status in (404, 410):
                raise ImageError(f"{uri}: HTTP {status} not found", ErrorCode.not_found)
            if status in (401, 403, 451):
                raise ImageError(f"{uri}: HTTP {status} access denied", ErrorCode.access_denied)
            if status in _TRANSIENT_STATUS or status >= 500:
                raise _Retry(f"HTTP {status}", status)
            raise ImageError(f"{uri}: HTTP {status} {resp.reason}", ErrorCode.fetch_error)
        finally:
            conn.close()
    raise ImageError(f"{uri}: more than {MAX_REDIRECTS} redirects", ErrorCode.fetch_error)


def fetch_http(uri: str, policy: FetchPolicy, on_size=None) -> Fetched:
    """``on_size(n | None)``: called with the announced ``Content-Length`` (None when there is
    none) before the body is read, on every attempt that gets as far as a 2xx answer."""
    if not policy.allow_http:
        raise ImageError(f"{uri}: http(s) fetching is disabled; enable it with "
                         "HARDNET_ALLOW_HTTP=1 and list the hosts in HARDNET_HTTP_ALLOW_HOSTS",
                         ErrorCode.unsupported_scheme)
    parse_http(uri)
    deadline = time.monotonic() + policy.timeout_s
    last = ""
    last_status = 0
    for attempt in range(ATTEMPTS):
        try:
            return _attempt(uri, policy, deadline, on_size)
        except (ImageError, TransientError):
            raise
        except _Retry as e:
            last, last_status = str(e), e.status
        except ssl.SSLCertVerificationError as e:
            raise ImageError(f"{uri}: TLS certificate check failed ({e.verify_message})",
                             ErrorCode.fetch_error) from None
        except (TimeoutError, socket.timeout):
            raise ImageError(f"{uri}: timed out after {policy.timeout_s}s", ErrorCode.timeout) from None
        except (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError) as e:
            last, last_status = f"{type(e).__name__}: {e}", 0
        if time.monotonic() + 0.2 * 2 ** attempt > deadline:
            break
        if attempt + 1 < ATTEMPTS:
            time.sleep(0.2 * 2 ** attempt)
    code = ErrorCode.throttled if last_status in _THROTTLE_STATUS else ErrorCode.fetch_error
    raise TransientError(f"{uri}: http fetch kept failing ({last})", code)
