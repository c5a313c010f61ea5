"""ASGI entry point: `uvicorn controlplane.asgi:application` (what `atelier web` runs)."""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.local")

from controlplane.core.asgi_limits import BodySizeLimit  # noqa: E402

django_application = get_asgi_application()
application = BodySizeLimit(
    django_application,
    default_limit=settings.MAX_REQUEST_BODY_BYTES,
    limits_by_prefix=getattr(settings, "REQUEST_BODY_LIMITS_BY_PREFIX", {}),
)
