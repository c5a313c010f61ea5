"""Database: DATABASE_URL, or an embedded SQLite file under the data directory."""

from .env import DATA_DIR, env

DATA_DIR.mkdir(parents=True, exist_ok=True)

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'atelier.sqlite3'}"),
}

if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Under ASGI every request may run on a different thread: a pool serves
    # them without a connection per thread (Django 5.1+, psycopg 3).
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"]["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN", default=2),
        "max_size": env.int("DATABASE_POOL_MAX", default=20),
        "timeout": env.int("DATABASE_POOL_TIMEOUT", default=10),
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web server and the control worker share the embedded file.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].setdefault(
        "init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
    )
    DATABASES["default"]["OPTIONS"].setdefault("transaction_mode", "IMMEDIATE")
