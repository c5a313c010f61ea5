"""Rate limits and budgets: Redis keys, in-process caches, reservations (limits come from plans)."""

from .env import env

#: Prefix of every rate-limit and budget key in Redis (one Redis may serve several sites).
LIMITS_KEY_PREFIX = env.str("LIMITS_KEY_PREFIX", default="atelier:limits")
#: How long a process keeps an organization's resolved limits and budgets. They are on
#: the request path; a change made in another process is seen after at most this long.
LIMITS_CACHE_SECONDS = env.float("LIMITS_CACHE_SECONDS", default=5.0)
#: A budget reservation not settled within this long (a crashed request) stops holding
#: budget; its settle, if it ever comes, still counts the spend.
LIMITS_RESERVATION_TTL_SECONDS = env.float("LIMITS_RESERVATION_TTL_SECONDS", default=900.0)
#: Timeout of a limits round trip to Redis (seconds).
LIMITS_REDIS_TIMEOUT_SECONDS = env.float("LIMITS_REDIS_TIMEOUT_SECONDS", default=2.0)
