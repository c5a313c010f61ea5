"""Celery: the same broker configuration the GPU workers read (jobcontracts.broker)."""

from jobcontracts.broker import celery_config

from .env import env

_conf = celery_config()
CELERY_BROKER_URL = _conf["broker_url"]
CELERY_BROKER_TRANSPORT_OPTIONS = _conf["broker_transport_options"]
CELERY_RESULT_BACKEND = _conf["result_backend"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

#: How often beat expires uploads past their deadline and deletes their parts.
UPLOAD_EXPIRE_EVERY_SECONDS = env.float("UPLOAD_EXPIRE_EVERY_SECONDS", default=300.0)
DATASETS_BEAT_SCHEDULE = {
    "datasets-expire-uploads": {
        "task": "controlplane.datasets.expire_uploads",
        "schedule": UPLOAD_EXPIRE_EVERY_SECONDS,
    },
}
