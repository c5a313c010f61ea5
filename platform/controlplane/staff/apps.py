from django.apps import AppConfig


class StaffConfig(AppConfig):
    name = "controlplane.staff"
    label = "staff"
    verbose_name = "Staff"

    def ready(self) -> None:
        # The dashboard is a page of the admin site: its URL sits in the admin's own
        # (before the admin's catch-all), behind `admin_view` (staff only, login
        # redirect), and the admin index links to it. The `admin/index.html` of
        # django.contrib.admin comes first in the template search (it is installed
        # first), so the index names its template instead of being overridden.
        from django.contrib import admin
        from django.urls import URLPattern, URLResolver, path

        from .views import dashboard_view

        site = admin.site
        admin_urls = site.get_urls

        def get_urls() -> list[URLResolver | URLPattern]:
            dashboard = path("dashboard/", site.admin_view(dashboard_view), name="dashboard")
            return [dashboard, *admin_urls()]

        site.get_urls = get_urls  # type: ignore[method-assign]
        site.index_template = "staff/admin_index.html"
