"""The client's address, trusting X-Forwarded-For only from NUM_PROXIES proxies."""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest


def client_ip(request: HttpRequest) -> str | None:
    address = request.META.get("REMOTE_ADDR") or None
    proxies = settings.REST_FRAMEWORK.get("NUM_PROXIES") or 0
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if proxies and forwarded:
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if hops:
            address = hops[-min(proxies, len(hops))]
    try:
        return str(ipaddress.ip_address(address)) if address else None
    except ValueError:
        return None
