"""The staff dashboard (`/admin/dashboard/`): served by the admin site, staff only."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse

from . import selectors


def dashboard_view(request: HttpRequest) -> TemplateResponse:
    """Jobs per queue, failed jobs of the day, inference of the hour, revenue of the month.
    Wrapped in `admin_view` (apps.py): anonymous and non-staff go to the admin login."""
    context = {
        **admin.site.each_context(request),
        "title": "Staff dashboard",
        **selectors.dashboard(),
    }
    return TemplateResponse(request, "staff/dashboard.html", context)
