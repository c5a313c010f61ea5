from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "controlplane.payments"
    label = "payments"

    def ready(self) -> None:
        # Billing invoices and payments collects: billing sits below and never imports
        # payments, so Stripe's push is registered with it here.
        from controlplane.billing.invoicing import Collector, invoice_collector_set

        from . import gateway, services

        invoice_collector_set(Collector(enabled=gateway.enabled, push=services.invoice_push))
