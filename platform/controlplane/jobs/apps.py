from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "controlplane.jobs"
    label = "jobs"

    def ready(self) -> None:
        # A model card shows the job that made the model; the model registry sits below
        # jobs and never imports it, so the lineage reader is registered with it here.
        from controlplane.modelregistry.cards import card_lineage_set

        from .cards import lineage
        from .transitions import connect

        card_lineage_set(lineage)
        connect()  # a `job.transition` log line for every status change
