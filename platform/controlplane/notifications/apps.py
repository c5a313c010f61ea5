from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "controlplane.notifications"
    label = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        # The signals the apps below send (jobs, batches, limits, billing, payments).
        from .receivers import connect

        connect()
