"""The Batch API: how lines are fed to the inference workers, and what they cost."""

from decimal import Decimal

from .env import env

#: A batch line costs this share of the live price of its tokens (OpenAI: half). The
#: batch price of every (meter, model) is derived from the price book's live price in
#: force when the line ran, times this factor, and written on the ledger entry.
BATCH_PRICE_FACTOR = Decimal(env.str("BATCH_PRICE_FACTOR", default="0.5"))
#: Lines a runner keeps sent and unanswered at once (the inference workers hold only a
#: few batch requests each; the rest wait in the low-priority list).
BATCH_IN_FLIGHT = env.int("BATCH_IN_FLIGHT", default=128)
#: Lines read from PostgreSQL per round, and results written per UPDATE.
BATCH_CHUNK = env.int("BATCH_CHUNK", default=256)
#: A line sent this long ago without an answer is taken as lost (its worker died) and
#: sent again; the worker drops a request past this deadline, so it never runs twice.
BATCH_LINE_TIMEOUT_SECONDS = env.float("BATCH_LINE_TIMEOUT_SECONDS", default=600.0)
#: Most lines in one batch (OpenAI: 50,000).
BATCH_MAX_LINES = env.int("BATCH_MAX_LINES", default=50_000)

#: How often beat looks for batches whose runner was lost (a control worker killed
#: mid-batch, a message lost: `controlplane.batches.reap`) and expires the batches
#: that could not start within their completion window.
BATCH_REAP_EVERY_SECONDS = env.float("BATCH_REAP_EVERY_SECONDS", default=30.0)
#: A batch no runner holds is sent again at most this often, and not in its first this
#: many seconds (its task may be waiting in the queue behind others; a second runner
#: of a batch only finds it busy or done, so this bounds the duplicates, nothing more).
BATCH_RESUME_AFTER_SECONDS = env.float("BATCH_RESUME_AFTER_SECONDS", default=120.0)
BATCHES_BEAT_SCHEDULE = {
    "batches-reap": {"task": "controlplane.batches.reap", "schedule": BATCH_REAP_EVERY_SECONDS},
}
