from django.apps import AppConfig


class EngagementsConfig(AppConfig):
    name = "controlplane.engagements"
    label = "engagements"
    verbose_name = "Custom engagements"

    def ready(self) -> None:
        from controlplane.jobs.services import retry_check_register

        from . import signals  # noqa: F401  (connects the receivers)
        from .services import engagement_job_retry_check

        retry_check_register(engagement_job_retry_check)
