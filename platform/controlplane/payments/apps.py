from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "controlplane.payments"
    label = "payments"
