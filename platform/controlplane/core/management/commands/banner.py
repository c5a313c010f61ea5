"""Printed by `make run` before the processes start: where things are and how to begin."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Print the URLs of a local Atelier and how to sign up."

    def handle(self, *args: Any, **options: Any) -> None:
        host = os.environ.get("HOST", "127.0.0.1")
        if host in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere; show loopback
            host = "127.0.0.1"
        url = f"http://{host}:{os.environ.get('PORT', '8000')}"
        db = settings.DATABASES["default"]
        database = (
            db["NAME"] if db["ENGINE"].endswith("sqlite3") else f"{db['ENGINE']} {db['HOST']}"
        )
        self.stdout.write(
            f"""
  Atelier is starting on {url}
    API            {url}/v1/        docs: {url}/docs
    Admin          {url}/admin/     (create a staff login: make superuser)
    Health         {url}/healthz    readiness: {url}/readyz
    Database       {database}
    Broker         {settings.CELERY_BROKER_URL}

  Sign up and get an API key:
    curl -s {url}/v1/signup -H 'content-type: application/json' \\
      -d '{{"email":"you@example.com","password":"a long passphrase","organization_name":"Acme"}}'
  Then walk the whole product: make demo
  Ctrl-C stops the web server and every worker.
"""
        )
