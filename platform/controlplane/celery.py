"""Celery app of the control plane (queue `control`): `atelier worker control`."""

import os

from celery import Celery

from jobcontracts import queues

# Production unless told otherwise (see manage.py).
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.production")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_routes = {
    "controlplane.*": {"queue": queues.CONTROL},
    "gpuworkers.*": {"queue": queues.GPU_TRAINING},
}
app.autodiscover_tasks()


@app.task(name=queues.CONTROL_PING, soft_time_limit=10, time_limit=20)
def ping() -> dict[str, bool]:
    return {"ok": True}
