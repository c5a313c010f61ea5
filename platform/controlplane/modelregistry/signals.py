"""What the model registry announces to the apps above it (it imports none of them).

Receivers run synchronously, inside the sender's transaction: one that raises rolls
the change back with it.
"""

from django.dispatch import Signal

#: A customer model was soft-deleted (`services.customer_model_delete`); sent with
#: `model`, the CustomerModel. Inference deletes its deployments.
customer_model_deleted = Signal()
