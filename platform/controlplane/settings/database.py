"""Database: the PostgreSQL named by DATABASE_URL (`make run` starts a private one)."""

from django.core.exceptions import ImproperlyConfigured

from .env import DATA_DIR, env

DATA_DIR.mkdir(parents=True, exist_ok=True)

if not env.str("DATABASE_URL", default=""):
    raise ImproperlyConfigured(
        "DATABASE_URL is not set. `make run` starts a private PostgreSQL under the data "
        "directory and sets it; anywhere else set "
        "DATABASE_URL=postgres://USER:PASSWORD@HOST:5432/NAME."
    )
DATABASES = {"default": env.db_url("DATABASE_URL")}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured(
        "DATABASE_URL must name a PostgreSQL database (postgres://...): the ledger, "
        "rating and usage queries are PostgreSQL SQL."
    )

# Under ASGI every request may run on a different thread: a pool serves
# them without a connection per thread (Django 5.1+, psycopg 3).
DATABASES["default"].setdefault("OPTIONS", {})
DATABASES["default"]["OPTIONS"]["pool"] = {
    "min_size": env.int("DATABASE_POOL_MIN", default=2),
    "max_size": env.int("DATABASE_POOL_MAX", default=20),
    "timeout": env.int("DATABASE_POOL_TIMEOUT", default=10),
}
DATABASES["default"]["CONN_MAX_AGE"] = 0
