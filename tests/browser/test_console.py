"""The customer console in a real browser: a new customer signs up, logs out and back in,
creates an API key and sees its value once, revokes a key in place (htmx), and reads the
usage page with its charts. Every page is checked with axe-core (no serious or critical
violation), and nothing is fetched from outside 127.0.0.1 (htmx is served by the platform).

Only `atelier web` is needed, so this module runs it alone (its own `stack`), not the
workers of conftest.py. axe-core (MPL-2.0) comes from the npm registry: `make
browser-test` fetches axe.min.js of the version the Makefile pins, checks its sha256 and
keeps it in tests/browser/.axe/ (ignored by git).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from controlplane.accounts.models import APIKey
from controlplane.billing.ledger import Entry, ledger_append_many
from controlplane.billing.models import Meter
from controlplane.tenancy.models import Organization
from tests.browser.helpers import Browse, Stack
from tests.support.people import sign_up
from tests.support.processes import asgi_server

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

AXE = Path(__file__).resolve().parent / ".axe" / "axe.min.js"
EMAIL = "erin@umbrella.test"
PASSWORD = "a long enough passphrase 42"


@pytest.fixture(scope="module")
def stack(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`atelier web` alone: the console needs no worker."""
    tmp = tmp_path_factory.mktemp("console-web")
    with asgi_server(tmp, DJANGO_ALLOW_ASYNC_UNSAFE="") as server:
        yield Stack(server.url, [server.log])


def axe_check(page: Page, name: str) -> None:
    """No axe-core violation of impact serious or critical on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    results: dict[str, Any] = page.evaluate("() => axe.run(document)")
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in results["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert bad == [], f"{name}: {bad}"
    assert results["passes"], name  # axe did run its rules


def fill_labelled(page: Page, fields: dict[str, str]) -> None:
    for label, value in fields.items():
        page.get_by_label(label, exact=True).fill(value)


def test_a_new_customer_signs_up_creates_a_key_and_reads_usage(browse: Browse) -> None:
    page = browse.page

    browse.goto("/console/")  # anonymous: to the log-in page
    expect(page).to_have_url(re.compile(r"/console/login/\?next=/console/$"))
    axe_check(page, "login")
    page.get_by_role("link", name="Sign up").click()
    expect(page.get_by_role("heading", name="Create your account")).to_be_visible()
    axe_check(page, "signup")
    fill_labelled(
        page, {"Email": EMAIL, "Password": PASSWORD, "Organization name": "Umbrella Labs"}
    )
    browse.shot("console-signup")
    page.get_by_role("button", name="Sign up").click()

    expect(page).to_have_url(re.compile(r"/console/$"))
    expect(page.get_by_role("heading", name="Umbrella Labs", level=1)).to_be_visible()
    expect(page.locator("#plan")).to_have_text("Free")
    expect(page.get_by_role("cell", name=EMAIL)).to_be_visible()
    axe_check(page, "overview")
    browse.shot("console-overview")

    # The skip link is the first stop of the keyboard, and it moves focus to the content.
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to main content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/console/login/$"))
    fill_labelled(page, {"Email": EMAIL, "Password": "not the password"})
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Email or password is wrong.")
    fill_labelled(page, {"Email": EMAIL, "Password": PASSWORD})
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/console/$"))

    page.get_by_role("link", name="API keys").click()
    expect(page.get_by_role("heading", name="API keys", level=1)).to_be_visible()
    axe_check(page, "keys")
    fill_labelled(page, {"Name": "production"})
    page.get_by_label("Scopes").select_option("inference")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("heading", name="Your new key: production")).to_be_visible()
    value = page.get_by_label("API key").input_value()
    assert value.startswith("atl_live_")
    axe_check(page, "key shown once")
    browse.shot("console-key-once")
    me = httpx.get(f"{browse.base_url}/v1/me", headers={"Authorization": f"Bearer {value}"})
    assert me.status_code == 200
    assert me.json()["organization"]["name"] == "Umbrella Labs"

    # Back on the list the key is redacted; its value is nowhere on the page.
    page.get_by_role("link", name="Back to API keys").click()
    expect(page.get_by_role("cell", name="production", exact=True)).to_be_visible()
    assert value not in page.content()

    # Revoking the default key swaps its row in place (htmx), after a confirmation.
    organization = Organization.objects.get(name="Umbrella Labs")
    default = APIKey.objects.for_organization(organization).get(name="Default key")
    row = page.locator(f"#key-{default.pk}")
    page.once("dialog", lambda dialog: dialog.accept())
    url_before = page.url
    row.get_by_role("button", name="Revoke Default key").click()
    expect(row.locator(".status-revoked")).to_have_text("revoked")
    assert page.url == url_before
    default.refresh_from_db()
    assert default.revoked_at is not None
    browse.shot("console-keys-revoked")

    # Usage the ledger holds for this organization shows on the charts and the table.
    now = timezone.now()
    ledger_append_many(
        [
            Entry(
                organization_id=organization.pk,
                idempotency_key=f"console-browser:{i}",
                meter=Meter.PROMPT_TOKENS,
                quantity=quantity,
                occurred_at=now - timedelta(days=days_ago),
                source="test",
                model=model,
                reference=f"req-{i}",
            )
            for i, (model, quantity, days_ago) in enumerate(
                [("tiny-chat", 1200, 3), ("tiny-chat", 800, 0), ("tiny-embed", 300, 1)]
            )
        ]
    )
    page.get_by_role("link", name="Usage and costs").click()
    expect(page.get_by_role("heading", name="Usage and costs")).to_be_visible()
    expect(page.locator("#total-tokens")).to_have_text("2300")
    expect(page.locator('#tokens-chart g.series[data-name="tiny-chat"]')).to_have_count(1)
    expect(page.locator('#cost-chart g.series[data-name="tiny-embed"]')).to_have_count(1)
    expect(page.locator("#usage-table tbody tr")).to_have_count(3)
    axe_check(page, "usage")
    browse.shot("console-usage")

    # Another organization's key id in the URL is the console's 404 page (with the
    # session's own CSRF token: the request is otherwise one the page could make).
    other = sign_up("mallory@other.test", "Other Org")
    other_key = APIKey.objects.for_organization(other.organization).get()
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(
        f"{browse.base_url}/console/keys/{other_key.pk}/revoke",
        headers={"X-CSRFToken": token},
    )
    assert response.status == 404
    assert "There is no API key with this id in your organization." in response.text()
    other_key.refresh_from_db()
    assert other_key.revoked_at is None
    forged = page.request.post(f"{browse.base_url}/console/keys/{other_key.pk}/revoke")
    assert forged.status == 403  # no CSRF token: refused before anything else
    browse.assert_stayed_local()
