"""Rate limits and budgets, under /v1/."""

from django.urls import path

from . import apis

urlpatterns = [
    path(
        "organization/api_keys/<str:key_id>/limits",
        apis.KeyLimitsApi.as_view(),
        name="api-key-limits",
    ),
    path("organization/rate_limits", apis.RateLimitsApi.as_view(), name="rate-limits"),
    path("organization/budgets", apis.BudgetListCreateApi.as_view(), name="budgets"),
    path(
        "organization/budgets/<str:budget_id>",
        apis.BudgetDetailApi.as_view(),
        name="budget-detail",
    ),
]
