"""Payments URLs (Stripe subscriptions and webhooks), under /v1/."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
