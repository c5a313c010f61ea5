from django.apps import AppConfig


class ModelRegistryConfig(AppConfig):
    name = "controlplane.modelregistry"
    label = "modelregistry"
    verbose_name = "Model registry"
