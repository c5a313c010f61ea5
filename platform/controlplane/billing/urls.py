"""Billing URLs (usage, costs, invoices), under /v1/.

`/v1/catalog/earnings` is routed in controlplane/urls.py, ahead of
`/v1/catalog/<listing_id>` which would otherwise take it.
"""

from django.urls import URLPattern, path

from . import apis

urlpatterns: list[URLPattern] = [
    path("organization/usage", apis.OrganizationUsageApi.as_view(), name="organization-usage"),
    path("organization/costs", apis.OrganizationCostsApi.as_view(), name="organization-costs"),
    path("organization/invoices", apis.InvoiceListApi.as_view(), name="invoices"),
    path(
        "organization/invoices/upcoming",
        apis.InvoiceUpcomingApi.as_view(),
        name="invoice-upcoming",
    ),
    path(
        "organization/invoices/<str:invoice_id>",
        apis.InvoiceDetailApi.as_view(),
        name="invoice-detail",
    ),
]
