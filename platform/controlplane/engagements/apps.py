from django.apps import AppConfig


class EngagementsConfig(AppConfig):
    name = "controlplane.engagements"
    label = "engagements"
    verbose_name = "Custom engagements"
