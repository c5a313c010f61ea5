"""The test suite: the real PostgreSQL and Redis named by env (defaults: local servers)."""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/atelier")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")

from .base import *  # noqa: F403
from .env import DATA_DIR

DEBUG = False
SECRET_KEY = "test-secret-key-not-for-production"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast tests only
CACHES["default"]["KEY_PREFIX"] = f"atelier-test-{os.getpid()}"  # noqa: F405
STORAGES["staticfiles"] = {  # noqa: F405
    "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
}
MEDIA_ROOT = DATA_DIR / "test-media"
STORAGES["default"] = {  # noqa: F405
    "BACKEND": "django.core.files.storage.FileSystemStorage",
    "OPTIONS": {"location": str(MEDIA_ROOT)},
}
WHITENOISE_USE_FINDERS = True
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# Tasks queued with .delay() run inline once their transaction commits (tests run
# the on-commit callbacks with django_capture_on_commit_callbacks); tests of real
# workers send by task name, which always goes through the broker.
CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True
# The webhook tests' receivers listen on 127.0.0.1 (the SSRF tests switch this off).
WEBHOOK_ALLOW_PRIVATE_URLS = True
