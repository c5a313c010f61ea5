"""What payments announce to the apps above them (Django signals).

Receivers run synchronously, inside the webhook's transaction: one that raises rolls the
event's processing back with it (and the event is retried).
"""

from django.dispatch import Signal

#: A Stripe invoice was paid or its payment failed (a verified webhook event, applied once);
#: sent with `organization`, `invoice` (the Stripe object as a dict) and `status` ("paid" or
#: "payment_failed"). Engagements follow the invoices of their billed milestones.
stripe_invoice_settled = Signal()
