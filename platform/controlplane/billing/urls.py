"""Billing URLs (usage, costs, budgets, credits, invoices), under /v1/."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
