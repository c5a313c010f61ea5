"""What billing announces to the apps above it (Django signals)."""

from django.dispatch import Signal

#: A ledger invoice's status moved forward (`invoicing.invoice_status_advance`: to open
#: when Stripe finalised it, paid, void), sent inside the writer's transaction, if any,
#: with `organization_id`, `invoice_id` and `status`. Notifications send `invoice.*`.
invoice_status_changed = Signal()
