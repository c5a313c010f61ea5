"""`GET /metrics`: the web's Prometheus metrics, for internal scrapers only.

Served when the request comes straight from an address in METRICS_ALLOWED_NETWORKS
(loopback and the private ranges by default) or carries `Authorization: Bearer
<METRICS_TOKEN>`. A request that came through a proxy (it carries X-Forwarded-For,
Forwarded or X-Real-IP) is never "internal", whatever its peer address: behind an
ingress every public caller arrives from a private address, and a trusted proxy's
X-Forwarded-For is the caller's to write. Anyone else gets the same 404 as an unknown
URL, so the endpoint is not advertised.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Sequence

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics
from .errors import handler404

PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def _networks(spec: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in spec if n.strip())


def internal(address: str | None, networks: Sequence[str]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _networks(tuple(networks)))


def token_ok(request: HttpRequest) -> bool:
    token: str = settings.METRICS_TOKEN
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def allowed(request: HttpRequest) -> bool:
    if token_ok(request):
        return True
    if any(request.META.get(header) for header in PROXY_HEADERS):
        return False
    return internal(request.META.get("REMOTE_ADDR"), settings.METRICS_ALLOWED_NETWORKS)


def metrics_view(request: HttpRequest) -> HttpResponse:
    if request.method not in ("GET", "HEAD") or not allowed(request):
        return handler404(request)
    return HttpResponse(generate_latest(metrics.registry()), content_type=CONTENT_TYPE_LATEST)
