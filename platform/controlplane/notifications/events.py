"""The event types a webhook can ask for."""

from __future__ import annotations

_JOB_ENDINGS = ("succeeded", "failed", "cancelled")

EVENT_TYPES: tuple[str, ...] = (
    *(f"fine_tuning.job.{s}" for s in _JOB_ENDINGS),
    *(f"compression.job.{s}" for s in _JOB_ENDINGS),
    *(f"evaluation.job.{s}" for s in _JOB_ENDINGS),
    *(f"batch.{s}" for s in ("completed", "failed", "expired", "cancelled")),
    "budget.threshold_reached",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_failed",
)

#: What a webhook's `events` may hold: the types, or "*" for all of them.
SUBSCRIBABLE = frozenset({*EVENT_TYPES, "*"})
