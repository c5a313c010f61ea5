"""Production: every required variable must be set; `check --deploy` is clean.

Required: SECRET_KEY (or SECRET_KEY_FILE), ALLOWED_HOSTS, DATABASE_URL, REDIS_URL.
"""

from django.core.exceptions import ImproperlyConfigured

from .env import env


def _required(name: str) -> str:
    value = env.str(name, default="")
    if not value:
        raise ImproperlyConfigured(f"{name} must be set in production (or {name}_FILE).")
    return str(value)


# Checked before the shared settings are read (they refuse to load without a database
# or Redis), so the first error names what production needs first.
_SECRET_KEY = _required("SECRET_KEY")
if _SECRET_KEY.startswith("django-insecure") or len(_SECRET_KEY) < 50:
    raise ImproperlyConfigured("SECRET_KEY must be a random value of at least 50 characters.")
_ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[]) or [_required("ALLOWED_HOSTS")]
_required("DATABASE_URL")
_required("REDIS_URL")

from .base import *  # noqa: E402, F403

DEBUG = False
SECRET_KEY = _SECRET_KEY
ALLOWED_HOSTS = _ALLOWED_HOSTS
# Webhooks go to public https URLs only (SSRF guard; an operator with internal receivers
# opts in by setting it).
WEBHOOK_ALLOW_PRIVATE_URLS = env.bool("WEBHOOK_ALLOW_PRIVATE_URLS", default=False)

SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
