from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "controlplane.accounts"
    label = "accounts"

    def ready(self) -> None:
        from . import schema, signals  # noqa: F401 - OpenAPI auth extension, key cache signals
