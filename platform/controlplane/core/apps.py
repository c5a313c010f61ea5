from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "controlplane.core"
    label = "core"

    def ready(self) -> None:
        # Make the control plane's Celery app the current one in every Django process,
        # so `shared_task`s queue through it (and its settings) rather than a default app.
        from controlplane import celery  # noqa: F401
