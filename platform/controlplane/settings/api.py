"""The public API: DRF, OpenAPI, throttles, body limits and API-key policy."""

from .env import env

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["controlplane.accounts.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "controlplane.core.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_THROTTLE_RATES": {
        "signup": env.str("SIGNUP_THROTTLE_RATE", default="10/hour"),
        "invite_accept": env.str("INVITE_ACCEPT_THROTTLE_RATE", default="30/hour"),
    },
    # Client IP for per-IP throttles: trust X-Forwarded-For only from this many proxies.
    "NUM_PROXIES": env.int("NUM_PROXIES", default=0),
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Atelier API",
    "DESCRIPTION": (
        "OpenAI-compatible API for fine-tuning, compressing and serving models. "
        "Authenticate with `Authorization: Bearer atl_live_…`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/v1",
}

#: Request bodies above this many bytes are refused with 413 before they are read.
MAX_REQUEST_BODY_BYTES = env.int("MAX_REQUEST_BODY_BYTES", default=1 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES

#: How long a rotated API key keeps working unless the caller asks otherwise.
API_KEY_ROTATION_GRACE_SECONDS = env.int("API_KEY_ROTATION_GRACE_SECONDS", default=24 * 3600)
#: The longest grace period a caller may ask for.
API_KEY_ROTATION_MAX_GRACE_SECONDS = env.int(
    "API_KEY_ROTATION_MAX_GRACE_SECONDS", default=7 * 24 * 3600
)
#: `last_used_at` is written at most this often per key (no write per request).
API_KEY_LAST_USED_RESOLUTION_SECONDS = env.int("API_KEY_LAST_USED_RESOLUTION_SECONDS", default=60)
#: How long a web process may reuse a resolved API key (0: look it up on every
#: request). Changes to keys, members, organizations and users invalidate it at
#: once across processes (accounts/keycache.py); this bounds only what bypasses them.
API_KEY_CACHE_SECONDS = env.int("API_KEY_CACHE_SECONDS", default=60)
#: How long an invitation to an organization can be accepted.
INVITATION_TTL_SECONDS = env.int("INVITATION_TTL_SECONDS", default=7 * 24 * 3600)
