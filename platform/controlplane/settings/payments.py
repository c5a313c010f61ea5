"""Payments: Stripe (customers, subscriptions, invoices, webhooks, dunning).

An empty STRIPE_API_KEY turns billing through Stripe off: subscription endpoints
answer 503 `billing_disabled` saying so, and the webhook refuses every event.
"""

from decimal import Decimal

from .env import env

#: Secret key (`sk_live_…`/`sk_test_…`); may come from STRIPE_API_KEY_FILE.
STRIPE_API_KEY = env.str("STRIPE_API_KEY", default="")
#: Signing secret of the webhook endpoint (`whsec_…`); may come from STRIPE_WEBHOOK_SECRET_FILE.
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="")
#: Where the SDK sends API calls: empty for api.stripe.com, a loopback URL for localstripe.
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="")
#: Currency of plans and invoices (ISO code, lower-case as Stripe wants it).
STRIPE_CURRENCY = env.str("STRIPE_CURRENCY", default="usd")
#: Retries the SDK makes on network errors and 409/429/5xx (with the same idempotency key).
STRIPE_MAX_NETWORK_RETRIES = env.int("STRIPE_MAX_NETWORK_RETRIES", default=2)
#: How old a signed webhook may be (seconds) before it is refused as a replay.
STRIPE_WEBHOOK_TOLERANCE_SECONDS = env.int("STRIPE_WEBHOOK_TOLERANCE_SECONDS", default=300)
#: Largest webhook body accepted (Stripe's events are a few KiB).
STRIPE_WEBHOOK_MAX_BYTES = env.int("STRIPE_WEBHOOK_MAX_BYTES", default=512 * 1024)
#: After a failed invoice payment, inference keeps running this long before it is suspended.
PAYMENTS_DUNNING_GRACE_DAYS = env.float("PAYMENTS_DUNNING_GRACE_DAYS", default=7.0)
#: How long a web process trusts its cached view of an organization's billing standing.
PAYMENTS_STANDING_CACHE_SECONDS = env.float("PAYMENTS_STANDING_CACHE_SECONDS", default=5.0)
#: Smallest and largest prepaid credit one purchase may buy (USD, POST /v1/organization/credits).
PAYMENTS_CREDIT_PURCHASE_MIN = Decimal(env.str("PAYMENTS_CREDIT_PURCHASE_MIN", default="5.00"))
PAYMENTS_CREDIT_PURCHASE_MAX = Decimal(env.str("PAYMENTS_CREDIT_PURCHASE_MAX", default="10000.00"))
