"""Which webhook URLs may be called (SSRF guard).

Unless WEBHOOK_ALLOW_PRIVATE_URLS (local and test settings), a URL must be https and
every address its host resolves to must be public: not loopback, private, link-local,
multicast, reserved or unspecified. Checked when a webhook is created or changed AND at
each delivery, which then connects to the address it checked (a DNS answer that changes
between the check and the connection cannot point the request inward).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    """The URL may not be called; the message says why (shown to the customer)."""


@dataclass(frozen=True)
class Target:
    host: str  # as written in the URL (brackets stripped)
    port: int
    #: The checked address to connect to; None where private URLs are allowed.
    address: IPAddress | None


def _forbidden(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def url_parse(url: str, *, allow_private: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of a well-formed webhook URL, or UrlRefused. No DNS."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"The URL is malformed: {exc}.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or (scheme == "http" and not allow_private):
        raise UrlRefused("The URL must start with https://.")
    host = parts.hostname or ""
    if not host:
        raise UrlRefused("The URL has no host.")
    if parts.username or parts.password:
        raise UrlRefused("The URL must not hold a user name or password.")
    return scheme, host, port or (443 if scheme == "https" else 80)


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UrlRefused(f"The host '{host}' does not resolve ({exc}).") from None
    # Scope ids ("fe80::1%eth0") are dropped: the address itself decides.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def url_check(url: str) -> Target:
    """Where a delivery to `url` may connect, or UrlRefused (checks every address)."""
    allow = bool(settings.WEBHOOK_ALLOW_PRIVATE_URLS)
    _, host, port = url_parse(url, allow_private=allow)
    if allow:
        return Target(host=host, port=port, address=None)
    addresses = _resolve(host, port)
    if not addresses:
        raise UrlRefused(f"The host '{host}' does not resolve.")
    for ip in addresses:
        if _forbidden(ip):
            raise UrlRefused(
                f"The host '{host}' resolves to {ip}, a loopback, private, link-local, "
                "multicast or reserved address: webhooks are sent to public addresses only."
            )
    return Target(host=host, port=port, address=addresses[0])
