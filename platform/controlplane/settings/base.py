"""Everything every environment shares, assembled from the concern modules."""

from .api import *  # noqa: F403
from .batches import *  # noqa: F403
from .billing import *  # noqa: F403
from .cache import *  # noqa: F403
from .celery import *  # noqa: F403
from .database import *  # noqa: F403
from .django import *  # noqa: F403
from .inference import *  # noqa: F403
from .jobs import *  # noqa: F403
from .limits import *  # noqa: F403
from .logging import *  # noqa: F403
from .notifications import *  # noqa: F403
from .observability import *  # noqa: F403
from .payments import *  # noqa: F403
from .security import *  # noqa: F403
from .storage import *  # noqa: F403

# Each concern names its periodic tasks; beat runs them all.
CELERY_BEAT_SCHEDULE = {
    **CELERY_BEAT_SCHEDULE,  # noqa: F405
    **BILLING_BEAT_SCHEDULE,  # noqa: F405
    **DATASETS_BEAT_SCHEDULE,  # noqa: F405
    **BATCHES_BEAT_SCHEDULE,  # noqa: F405
}
