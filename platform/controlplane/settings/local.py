"""`make run` on a laptop: DEBUG, local files, and the PostgreSQL and Redis that
`atelier run` names in DATABASE_URL / REDIS_URL (its private servers unless you set
them). A command run beside it (`make superuser`) finds the private servers in the
data directory."""

import os

from controlplane.devservers import private_urls
from jobcontracts.broker import data_dir

for _name, _url in private_urls(data_dir()).items():
    os.environ.setdefault(_name, _url)
# Human-readable lines on a laptop (settings/logging.py reads it); JSON everywhere else.
os.environ.setdefault("LOG_FORMAT", "console")

from .base import *  # noqa: E402, F403
from .env import env  # noqa: E402

DEBUG = env.bool("DEBUG", default=True)
if DEBUG:
    # Serve static files straight from the apps: no collectstatic needed to develop.
    WHITENOISE_USE_FINDERS = True
    STORAGES["staticfiles"] = {  # noqa: F405
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
    }
# Webhooks may reach receivers on this machine (http://127.0.0.1:…) while developing.
WEBHOOK_ALLOW_PRIVATE_URLS = env.bool("WEBHOOK_ALLOW_PRIVATE_URLS", default=True)
