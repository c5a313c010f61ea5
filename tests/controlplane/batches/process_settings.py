"""Settings of the real processes the batch tests start (`atelier web`, the workers):
the test settings, with tasks sent through the broker as in production, not run inline
in the process that sends them (a batch created through `atelier web` runs on the
control worker, as it would in production)."""

from controlplane.settings.test import *  # noqa: F403

CELERY_TASK_ALWAYS_EAGER = False
