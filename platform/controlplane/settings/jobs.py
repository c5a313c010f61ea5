"""Fine-tuning jobs: plans' concurrency, leases, retries."""

from typing import Any

from .env import env

#: Per plan: fine-tuning jobs an organization may have dispatched or running at once.
#: (The billing issue turns plans into admin-editable data; this is their default.)
PLANS: dict[str, dict[str, Any]] = {
    "free": {"concurrent_fine_tuning_jobs": env.int("PLAN_FREE_CONCURRENT_JOBS", default=1)},
    "pro": {"concurrent_fine_tuning_jobs": env.int("PLAN_PRO_CONCURRENT_JOBS", default=4)},
    "enterprise": {
        "concurrent_fine_tuning_jobs": env.int("PLAN_ENTERPRISE_CONCURRENT_JOBS", default=16)
    },
}
#: A running attempt that has not reported for this long is presumed dead and re-queued.
JOBS_LEASE_SECONDS = env.float("JOBS_LEASE_SECONDS", default=120.0)
#: How often a worker heartbeats (sent in the spec); a fraction of the lease.
JOBS_HEARTBEAT_SECONDS = env.float("JOBS_HEARTBEAT_SECONDS", default=10.0)
#: A dispatched attempt no worker has started after this long is dispatched again.
JOBS_PICKUP_TIMEOUT_SECONDS = env.float("JOBS_PICKUP_TIMEOUT_SECONDS", default=3600.0)
#: Attempts lost to dead workers or unexpected errors before a job fails for good.
JOBS_MAX_ATTEMPTS = env.int("JOBS_MAX_ATTEMPTS", default=3)
JOBS_CHECKPOINT_EVERY_STEPS = env.int("JOBS_CHECKPOINT_EVERY_STEPS", default=50)
JOBS_CHECKPOINT_EVERY_SECONDS = env.float("JOBS_CHECKPOINT_EVERY_SECONDS", default=600.0)
#: How often the reaper looks for expired leases and dispatches queued jobs (celery beat).
JOBS_REAP_EVERY_SECONDS = env.float("JOBS_REAP_EVERY_SECONDS", default=5.0)
#: Most epochs a job may ask for (guards against typos such as 1000).
JOBS_MAX_EPOCHS = env.int("JOBS_MAX_EPOCHS", default=50)
#: Floating-point operations per second a compression worker sustains, for ETAs only.
JOBS_COMPRESSION_FLOPS = env.float("JOBS_COMPRESSION_FLOPS", default=5e10)

CELERY_BEAT_SCHEDULE = {
    "jobs-reap": {"task": "controlplane.jobs.reap", "schedule": JOBS_REAP_EVERY_SECONDS},
}
