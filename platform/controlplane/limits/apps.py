from django.apps import AppConfig


class LimitsConfig(AppConfig):
    name = "controlplane.limits"
    label = "limits"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (drops cached limits when they change)
