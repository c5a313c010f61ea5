"""Cache (throttles, shared state): the Redis named by REDIS_URL (or CACHE_URL)."""

from django.core.exceptions import ImproperlyConfigured

from .env import env

REDIS_URL = env.str("REDIS_URL", default="")
if not REDIS_URL:
    raise ImproperlyConfigured(
        "REDIS_URL is not set. `make run` starts a private Redis under the data directory "
        "and sets it; anywhere else set REDIS_URL=redis://HOST:6379/0."
    )

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env.str("CACHE_URL", default=REDIS_URL),
        "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="atelier"),
    }
}
