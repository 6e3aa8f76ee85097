"""SSRF guard for http(s) fetches: host allowlist and address checks.

Every address a host name resolves to is checked *before* connecting, and the fetcher then
connects to one of those vetted addresses (never resolves again), so DNS rebinding between the
check and the connection cannot slip a private address in. Redirect hops go through the same
checks (see :mod:`hnq.storage.http`).
"""
from __future__ import annotations

import ipaddress
import socket

from hnq.errors import ErrorCode, ImageError, TransientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def host_allowed(host: str, allow_hosts: tuple[str, ...] | list[str]) -> bool:
    """``host`` matches an entry of ``allow_hosts``: an exact name (or IP literal), ``*.example.com``
    (any subdomain of example.com, at any depth, not example.com itself) or ``*`` (any host).
    An empty allowlist allows nothing."""
    h = normalise_host(host)
    if not h:
        return False
    for entry in allow_hosts:
        e = normalise_host(entry)
        if not e:
            continue
        if e == "*":
            return True
        if e.startswith("*."):
            if h.endswith(e[1:]) and len(h) > len(e) - 1:
                return True
        elif h == e:
            return True
    return False


def is_public_address(ip: IPAddress | str) -> bool:
    """False for loopback, link-local (incl. 169.254.169.254 and fe80::/10), RFC 1918, CGNAT
    100.64/10, ULA fc00::/7, site-local, unspecified, multicast, reserved and documentation ranges;
    IPv4-mapped / NAT64-embedded IPv6 addresses are judged by their IPv4 address."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the IPv4 address is the tail
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and not is_public_address(ip.sixtofour):
            return False
        if ip.is_site_local:
            return False
    if (ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_unspecified
            or ip.is_multicast or ip.is_reserved):
        return False
    return ip.is_global


def resolve(host: str, port: int, timeout: float | None = None) -> list[str]:
    """All addresses ``host`` resolves to (IP literals resolve to themselves, whatever notation:
    ``2130706433`` and ``0x7f.1`` are 127.0.0.1). Tests replace this function."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise TransientError(f"temporary DNS failure resolving {host!r}: {e}") from None
        raise ImageError(f"host {host!r} does not resolve: {e}", ErrorCode.not_found) from None
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = sockaddr[0]
        if addr not in seen:
            seen.append(addr)
    return seen


def vet_addresses(host: str, addresses: list[str], allow_private_networks: bool) -> list[str]:
    """Raise ``forbidden`` when any address is not public (unless private networks are allowed);
    return the addresses."""
    if not addresses:
        raise ImageError(f"host {host!r} resolves to no address", ErrorCode.not_found)
    if allow_private_networks:
        return addresses
    for addr in addresses:
        try:
            ok = is_public_address(addr)
        except ValueError:
            ok = False
        if not ok:
            raise ImageError(
                f"host {host!r} resolves to {addr}, a private, loopback, link-local or otherwise "
                f"non-public address; refused (set HARDNET_ALLOW_PRIVATE_NETWORKS=1 to allow)",
                ErrorCode.forbidden)
    return addresses
