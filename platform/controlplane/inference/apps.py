from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "controlplane.inference"
    label = "inference"

    def ready(self) -> None:
        from . import signals  # noqa: F401
