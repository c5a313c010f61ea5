"""Payments URLs (Stripe subscriptions, credit purchases and webhooks), under /v1/."""

from django.urls import URLPattern, path

from . import apis

urlpatterns: list[URLPattern] = [
    path(
        "organization/subscription",
        apis.SubscriptionDetailApi.as_view(),
        name="subscription",
    ),
    path(
        "organization/subscription/cancel",
        apis.SubscriptionCancelApi.as_view(),
        name="subscription-cancel",
    ),
    path("organization/credits", apis.OrganizationCreditsApi.as_view(), name="credits"),
    path("stripe/webhook", apis.stripe_webhook, name="stripe-webhook"),
]
