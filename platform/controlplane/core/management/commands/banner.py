"""Printed by `make run` before the processes start: where things are and how to begin."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand

from jobcontracts.broker import data_dir


class Command(BaseCommand):
    help = "Print the URLs of a local Atelier and how to sign up."

    def handle(self, *args: Any, **options: Any) -> None:
        host = os.environ.get("HOST", "127.0.0.1")
        if host in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere; show loopback
            host = "127.0.0.1"
        url = f"http://{host}:{os.environ.get('PORT', '8000')}"
        db = settings.DATABASES["default"]
        database = f"PostgreSQL {db['HOST']}:{db['PORT']}/{db['NAME']}"
        # The broker's password (the private Redis has one) stays out of the log.
        broker = urlsplit(settings.CELERY_BROKER_URL)
        broker_at = f"{broker.scheme}://{broker.netloc.rpartition('@')[2]}{broker.path}"
        self.stdout.write(
            f"""
  Atelier is starting on {url}
    API            {url}/v1/        docs: {url}/docs
    Admin          {url}/admin/     (create a staff login: make superuser)
    Health         {url}/healthz    readiness: {url}/readyz
    Database       {database}
    Broker         {broker_at}
    Data           {data_dir()}

  Sign up and get an API key:
    curl -s {url}/v1/signup -H 'content-type: application/json' \\
      -d '{{"email":"you@example.com","password":"a long passphrase","organization_name":"Acme"}}'
  Then walk the whole product: make demo
  Ctrl-C stops everything `make run` started.
"""
        )
