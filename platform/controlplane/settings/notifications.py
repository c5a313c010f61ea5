"""Webhooks (controlplane.notifications): timeouts, retries, which addresses they may reach."""

from .env import env

#: Whether webhook URLs may be http:// or reach loopback, private, link-local or reserved
#: addresses. Off unless set (production: SSRF guard); on in the local and test settings,
#: whose receivers listen on 127.0.0.1.
WEBHOOK_ALLOW_PRIVATE_URLS = env.bool("WEBHOOK_ALLOW_PRIVATE_URLS", default=False)
#: One delivery's limit (connect, send, read), seconds.
WEBHOOK_TIMEOUT_SECONDS = env.float("WEBHOOK_TIMEOUT_SECONDS", default=5.0)
#: The wait before each retry of a failed delivery (network error, timeout, 5xx, 429):
#: at most len + 1 attempts.
WEBHOOK_RETRY_DELAYS_SECONDS: tuple[float, ...] = (10.0, 60.0, 600.0, 3600.0, 21600.0)
