"""What fine-tuning jobs announce to the apps above them (Django signals; the
pause/cancel signals a worker reads are `dispatch.write_signal`'s).

Receivers run synchronously, inside the sender's transaction: one that raises rolls
the change back with it.
"""

from django.dispatch import Signal

#: A job succeeded and its final model is registered, inside the transaction that records
#: it (a report applied twice sends it twice); sent with `job` and `model`. Inference
#: makes the model callable, as a fine-tuned model answers as soon as its job is done.
job_succeeded = Signal()

#: A job's status changed (any writer that saves the job: services, reports, the reaper,
#: the admin), inside the saving transaction; sent with `job`, `before` (None when it was
#: created) and `after`. Notifications send webhooks for the terminal ones after commit.
job_transitioned = Signal()
