"""localstripe (a stateful fake Stripe server from PyPI) on loopback, for the payments tests.

It runs as a subprocess on a free 127.0.0.1 port and is stopped by its own pid.
Two changes to how localstripe is *run*, none to what it answers:

- it binds to 127.0.0.1 (its own `start()` binds every interface, `::`);
- its store is not pickled to the fixed path `/tmp/localstripe.pickle` after
  every write (two test sessions on one machine would read each other's
  customers), so each session starts empty.

localstripe ignores `Idempotency-Key` headers, has no Prices API and no meters,
and sends webhooks only for a subset of event types (see README, "Stripe: what is
exercised against localstripe").
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from .processes import free_port

API_KEY = "sk_test_atelier_localstripe"
WEBHOOK_SECRET = "whsec_atelier_localstripe_test"

_SERVE = """
import sys
from aiohttp import web
from localstripe import resources, server
resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None
web.run_app(server.app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


@dataclass
class LocalStripe:
    url: str
    process: subprocess.Popen[bytes]

    def _http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        )

    def register_webhook(self, url: str, secret: str = WEBHOOK_SECRET) -> None:
        """Ask localstripe to POST its events, signed with `secret`, to `url`."""
        with self._http() as http:
            http.post("/_config/webhooks/atelier", data={"url": url, "secret": secret})

    def forget_webhooks(self) -> None:
        # localstripe has no route to delete a webhook: point it at a closed port instead.
        self.register_webhook(f"http://127.0.0.1:{free_port()}/gone")

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        with self._http() as http:
            response = http.get(path, params=params)
            response.raise_for_status()
            body: dict[str, Any] = response.json()
            return body

    def post(self, path: str, **data: Any) -> dict[str, Any]:
        with self._http() as http:
            response = http.post(path, data=data)
            response.raise_for_status()
            body: dict[str, Any] = response.json()
            return body

    def card(self, customer_id: str, number: str = "4242424242424242") -> str:
        """A card payment method attached to the customer and made its default.

        `4000000000000341` attaches but every charge on it is declined.
        """
        pm = self.post(
            "/v1/payment_methods",
            **{
                "type": "card",
                "card[number]": number,
                "card[exp_month]": "12",
                "card[exp_year]": "2040",
                "card[cvc]": "123",
            },
        )
        self.post(f"/v1/payment_methods/{pm['id']}/attach", customer=customer_id)
        self.post(
            f"/v1/customers/{customer_id}",
            **{"invoice_settings[default_payment_method]": pm["id"]},
        )
        return str(pm["id"])

    def sepa_debit(self, customer_id: str, iban: str = "DE62370400440532013001") -> str:
        """A SEPA debit payment method made the customer's default.

        The default IBAN is localstripe's failing one: charges stay pending, then fail
        half a second later, and localstripe sends `invoice.payment_failed` (a declined
        card fails at once, and localstripe sends no invoice event for that).
        """
        pm = self.post("/v1/payment_methods", type="sepa_debit", **{"sepa_debit[iban]": iban})
        self.post(f"/v1/payment_methods/{pm['id']}/attach", customer=customer_id)
        self.post(
            f"/v1/customers/{customer_id}",
            **{"invoice_settings[default_payment_method]": pm["id"]},
        )
        return str(pm["id"])

    def allow_invoices(self, customer_id: str) -> None:
        """Subscribe the customer to a $0 plan: localstripe creates an invoice (POST
        /v1/invoices) only for a customer with a subscription, which real Stripe does not
        require. The $0 subscription adds one zero-amount line to each invoice."""
        plan_id = "localstripe-zero"
        try:
            self.get(f"/v1/plans/{plan_id}")
        except httpx.HTTPStatusError:
            self.post(
                "/v1/plans",
                id=plan_id,
                amount="0",
                currency="usd",
                interval="month",
                **{"product[name]": "localstripe: lets invoices exist"},
            )
        self.post("/v1/subscriptions", customer=customer_id, **{"items[0][plan]": plan_id})


def start() -> LocalStripe:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVE, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalStripe(url=f"http://127.0.0.1:{port}", process=process)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"localstripe exited with {process.returncode} before answering")
        try:
            server.get("/v1/customers")
            return server
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                stop(server)
                raise RuntimeError("localstripe did not answer within 30 s") from None
            time.sleep(0.1)


def stop(server: LocalStripe) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def localstripe() -> Iterator[LocalStripe]:
    """One localstripe server for the whole session (its data persists across tests)."""
    server = start()
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture
def stripe_settings(settings: Any, localstripe: LocalStripe) -> LocalStripe:
    """Django settings pointed at localstripe: billing through Stripe enabled."""
    settings.STRIPE_API_KEY = API_KEY
    settings.STRIPE_API_BASE = localstripe.url
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    return localstripe
