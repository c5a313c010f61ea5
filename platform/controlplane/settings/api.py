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

# --- files and uploads -----------------------------------------------------------------------
#: Largest file accepted by POST /v1/files (larger ones use /v1/uploads), as OpenAI's 512 MB.
FILE_UPLOAD_MAX_BYTES = env.int("FILE_UPLOAD_MAX_BYTES", default=512 * 1024 * 1024)
#: Largest file assembled from an upload's parts.
UPLOAD_MAX_BYTES = env.int("UPLOAD_MAX_BYTES", default=8 * 1024 * 1024 * 1024)
#: Largest single part of an upload.
UPLOAD_PART_MAX_BYTES = env.int("UPLOAD_PART_MAX_BYTES", default=64 * 1024 * 1024)
#: How long an upload may stay pending before it expires.
UPLOAD_TTL_SECONDS = env.int("UPLOAD_TTL_SECONDS", default=3600)
#: Stored bytes (files + pending uploads) one organization may hold.
ORG_STORAGE_QUOTA_BYTES = env.int("ORG_STORAGE_QUOTA_BYTES", default=100 * 1024 * 1024 * 1024)
#: Longest line validation reads before calling it an error (constant memory per row).
VALIDATION_MAX_LINE_BYTES = env.int("VALIDATION_MAX_LINE_BYTES", default=8 * 1024 * 1024)
#: Line errors kept in a file's report (all are counted).
VALIDATION_MAX_ERRORS = env.int("VALIDATION_MAX_ERRORS", default=100)
#: POST /v1/files/{id}/validate counts tokens of files up to this size in the request
#: (tokenizing runs at ~1.5-4 MB/s a core: 1 MB takes under a second); larger ones
#: on the `control` queue (202 `in_progress` until the report is ready).
FILE_ESTIMATE_SYNC_MAX_BYTES = env.int("FILE_ESTIMATE_SYNC_MAX_BYTES", default=1024 * 1024)
#: A failed report is shown as failed for this long, then computed again on request.
FILE_ESTIMATE_RETRY_SECONDS = env.int("FILE_ESTIMATE_RETRY_SECONDS", default=60)
#: A report in progress for longer than this (the task's time limit) is started again.
FILE_ESTIMATE_STALE_SECONDS = env.int("FILE_ESTIMATE_STALE_SECONDS", default=3 * 3600 + 120)

_MULTIPART_OVERHEAD = 1024 * 1024
#: The ASGI body limit per path prefix (everything else: MAX_REQUEST_BODY_BYTES).
REQUEST_BODY_LIMITS_BY_PREFIX = {
    "/v1/files": FILE_UPLOAD_MAX_BYTES + _MULTIPART_OVERHEAD,
    "/v1/uploads/": UPLOAD_PART_MAX_BYTES + _MULTIPART_OVERHEAD,
}
# Uploaded files stream to a temporary file above this size, never into memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
