"""The ASGI front door: `POST` to the four inference URLs is served here, on the event
loop (`call.Call`); everything else goes to Django unchanged (`controlplane.asgi`).

A proxied model call must cost the caller a few milliseconds at most, and the Django
request path costs more than that before a view runs: the middleware chain, DRF's
request wrapping, and a thread hop for a sync view, which would also hold a thread for
the whole generation (bench/README.md). So inference never goes through Django: the
DRF views at these URLs (`schema.py`) only declare them for the OpenAPI schema.
"""

from __future__ import annotations

from controlplane.core.asgi_limits import ASGIApp, Receive, Scope, Send

from .call import Call
from .endpoints import ENDPOINTS


class ServingRouter:
    """ASGI: the inference POSTs here, everything else to `app` (Django)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = ENDPOINTS.get(scope["path"])
            if endpoint is not None:
                await Call(endpoint, scope, receive, send).run()
                return
        await self.app(scope, receive, send)
