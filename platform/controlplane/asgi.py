"""ASGI entry point: `uvicorn controlplane.asgi:application` (what `atelier web` runs)."""

import os
from typing import cast

from django.conf import settings
from django.core.asgi import get_asgi_application

from controlplane.core.asgi_limits import ASGIApp, BodySizeLimit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.production")

django_application = get_asgi_application()

from controlplane.serving.router import ServingRouter  # noqa: E402 - needs apps loaded

application = BodySizeLimit(
    ServingRouter(cast(ASGIApp, django_application)),
    default_limit=settings.MAX_REQUEST_BODY_BYTES,
    limits_by_prefix=getattr(settings, "REQUEST_BODY_LIMITS_BY_PREFIX", {}),
)
