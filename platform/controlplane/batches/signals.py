"""What batches announce to the apps above them (Django signals)."""

from django.dispatch import Signal

#: A batch reached a final status (completed, failed, expired, cancelled), sent inside the
#: writing transaction (or just after its UPDATE) with `batch_id`, `organization_id` and
#: `status`. Notifications send the `batch.*` webhooks once it commits.
batch_finished = Signal()
