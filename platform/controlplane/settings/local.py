"""`make run` on a laptop: embedded defaults (SQLite, filesystem broker, local files)."""

from .base import *  # noqa: F403
from .env import env

DEBUG = env.bool("DEBUG", default=True)
LOG_FORMAT = env.str("LOG_FORMAT", default="json")
if DEBUG:
    # Serve static files straight from the apps: no collectstatic needed to develop.
    WHITENOISE_USE_FINDERS = True
    STORAGES["staticfiles"] = {  # noqa: F405
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
    }
