"""The customer console at /console/: sign-up and log-in on session auth, the organization,
API keys (shown once, rotate, revoke) with the API's roles, usage and costs charts."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from django.http.response import HttpResponseBase
from django.test import Client
from django.utils import timezone

from controlplane.accounts.models import APIKey, User
from controlplane.audit.models import AuditLog
from controlplane.billing.ledger import Entry, ledger_append_many
from controlplane.billing.models import Meter
from controlplane.console.session import LOGIN_FAILURES
from controlplane.tenancy.models import Membership, Organization
from tests.controlplane.billing.factories import price
from tests.support.people import PASSWORD, Person, client_with, join

pytestmark = pytest.mark.django_db

PAGES = ["/console/", "/console/keys/", "/console/usage/"]
_n = count()


def logged_in(person: Person) -> Client:
    client = Client()
    assert client.login(username=person.user.email, password=PASSWORD)
    return client


def body(response: HttpResponseBase) -> str:
    return bytes(response.content).decode()  # type: ignore[attr-defined]


def key_value(html: str) -> str:
    found = re.search(r'id="key-value"[^>]*value="(atl_live_[^"]+)"', html)
    assert found, html[:3000]
    return found.group(1)


@pytest.fixture
def vera(alice: Person) -> Person:
    """A viewer in Acme."""
    return join(alice.organization, "vera@acme.test", "viewer")


# --- anonymous, CSRF ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_anonymous_is_sent_to_the_login_page(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/console/login/?next={path}"


def test_anonymous_posts_are_sent_to_the_login_page(alice: Person) -> None:
    key_id = APIKey.objects.for_organization(alice.organization).get().pk
    for path in ("/console/keys/", f"/console/keys/{key_id}/revoke"):
        response = Client().post(path, {"name": "x"})
        assert response.status_code == 302
        assert response["Location"].startswith("/console/login/")
    assert APIKey.objects.for_organization(alice.organization).get().revoked_at is None


def test_every_form_needs_the_csrf_token(alice: Person) -> None:
    strict = Client(enforce_csrf_checks=True)
    refused = strict.post("/console/login/", {"email": alice.user.email, "password": PASSWORD})
    assert refused.status_code == 403
    page = strict.get("/console/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', body(page))
    assert token
    ok = strict.post(
        "/console/login/",
        {"email": alice.user.email, "password": PASSWORD, "csrfmiddlewaretoken": token.group(1)},
    )
    assert ok.status_code == 302
    assert ok["Location"] == "/console/"
    # Logged in now: a write without the token is still refused, and changes nothing.
    assert strict.post("/console/keys/", {"name": "forged"}).status_code == 403
    assert strict.post("/console/logout/").status_code == 403
    assert APIKey.objects.for_organization(alice.organization).count() == 1
    for path in PAGES:
        assert 'name="csrfmiddlewaretoken"' in body(strict.get(path))  # the log-out form


# --- sign-up, log-in, log-out ----------------------------------------------------------------


def test_sign_up_creates_the_account_and_organization_and_logs_in() -> None:
    client = Client()
    page = client.get("/console/signup/")
    assert page.status_code == 200
    html = body(page)
    for name in ("email", "password", "organization_name"):
        assert re.search(rf'<label for="id_{name}">', html), name
    response = client.post(
        "/console/signup/",
        {"email": "Dana@Initech.test", "password": PASSWORD, "organization_name": "Initech"},
    )
    assert response.status_code == 302
    assert response["Location"] == "/console/"
    overview = body(client.get("/console/"))
    assert "Initech" in overview
    assert "dana@initech.test" in overview
    user = User.objects.get(email="dana@initech.test")
    organization = Organization.objects.get(name="Initech")
    assert Membership.objects.for_organization(organization).get(user=user).role == "owner"
    audit = AuditLog.objects.for_organization(organization)
    assert audit.filter(action="organization.created", actor_id=user.pk).exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"email": "not-an-email", "password": PASSWORD, "organization_name": "X"}, "valid email"),
        ({"email": "e@x.test", "password": "short", "organization_name": "X"}, "too weak"),
        ({"email": "e@x.test", "password": PASSWORD, "organization_name": ""}, "required"),
        ({"email": "e@x.test", "password": PASSWORD, "organization_name": "x" * 201}, "at most"),
        ({"email": "alice@acme.test", "password": PASSWORD, "organization_name": "X"}, "exists"),
    ],
)
def test_sign_up_refuses_malformed_input_on_the_form(
    alice: Person, fields: dict[str, str], message: str
) -> None:
    response = Client().post("/console/signup/", fields)
    assert response.status_code == 400
    assert message in body(response)
    assert not User.objects.filter(email="e@x.test").exists()


def test_sign_up_is_throttled_like_the_api(settings: object) -> None:
    client = Client()
    for i in range(10):  # SIGNUP_THROTTLE_RATE: 10/hour per client address
        assert client.post("/console/signup/", {"email": f"bad{i}"}).status_code == 400
    refused = client.post(
        "/console/signup/",
        {"email": "late@x.test", "password": PASSWORD, "organization_name": "Late"},
    )
    assert refused.status_code == 429
    assert "Too many sign-ups" in body(refused)
    assert not User.objects.filter(email="late@x.test").exists()
    # The same allowance as POST /v1/signup: the API refuses this address too.
    api = client_with(None).post(
        "/v1/signup",
        {"email": "api@x.test", "password": PASSWORD, "organization_name": "A"},
        format="json",
    )
    assert api.status_code == 429


def test_log_in_and_out(alice: Person) -> None:
    client = Client()
    wrong = client.post("/console/login/", {"email": alice.user.email, "password": "nope"})
    assert wrong.status_code == 400
    assert "Email or password is wrong." in body(wrong)
    ok = client.post(
        "/console/login/?next=/console/keys/",
        {"email": "ALICE@acme.test", "password": PASSWORD, "next": "/console/keys/"},
    )
    assert ok.status_code == 302
    assert ok["Location"] == "/console/keys/"
    assert client.get("/console/keys/").status_code == 200
    assert client.get("/console/logout/").status_code == 405  # log-out is a POST (CSRF)
    out = client.post("/console/logout/")
    assert out.status_code == 302
    assert out["Location"] == "/console/login/"
    assert client.get("/console/").status_code == 302


def test_log_in_never_redirects_off_the_console(alice: Person) -> None:
    for nxt in ("https://evil.test/", "//evil.test/", "/admin/"):
        response = Client().post(
            "/console/login/", {"email": alice.user.email, "password": PASSWORD, "next": nxt}
        )
        assert response["Location"] == "/console/", nxt


@pytest.mark.parametrize(
    "fields", [{}, {"email": "not-an-email", "password": "x"}, {"email": "a@b.test"}]
)
def test_log_in_refuses_malformed_input(fields: dict[str, str]) -> None:
    response = Client().post("/console/login/", fields)
    assert response.status_code == 400
    assert 'role="alert"' in body(response)


def test_log_in_is_throttled_per_email_and_address(alice: Person, bob: Person) -> None:
    client = Client()
    for _ in range(LOGIN_FAILURES):
        failed = client.post("/console/login/", {"email": alice.user.email, "password": "nope"})
        assert failed.status_code == 400
    # Even the right password is refused now: guessing cannot continue.
    blocked = client.post("/console/login/", {"email": alice.user.email, "password": PASSWORD})
    assert blocked.status_code == 429
    assert "Too many failed log-ins" in body(blocked)
    assert "_auth_user_id" not in client.session
    # Another email from the same address, or the same email from another address, is not.
    assert (
        client.post("/console/login/", {"email": bob.user.email, "password": PASSWORD})
    ).status_code == 302
    elsewhere = Client(REMOTE_ADDR="198.51.100.7")
    ok = elsewhere.post("/console/login/", {"email": alice.user.email, "password": PASSWORD})
    assert ok.status_code == 302


# --- the organization ----------------------------------------------------------------------


def test_overview_shows_the_organization_plan_and_members(alice: Person, bob: Person) -> None:
    response = logged_in(bob).get("/console/")
    assert response.status_code == 200
    html = body(response)
    assert "Acme" in html
    assert alice.organization.pk in html
    assert 'id="plan">Free<' in html
    assert "alice@acme.test" in html
    assert "bob@acme.test" in html
    assert "Developer" in html
    assert "Owner" in html


def test_overview_shows_only_the_members_own_organization(alice: Person, charlie: Person) -> None:
    html = body(logged_in(charlie).get("/console/"))
    assert "Globex" in html
    assert "alice@acme.test" not in html
    assert "Acme" not in html


def test_the_base_template_is_accessible_markup(alice: Person) -> None:
    html = body(logged_in(alice).get("/console/"))
    assert '<html lang="en">' in html
    assert '<a class="skip-link" href="#main">' in html
    assert '<main id="main"' in html
    assert "<header" in html
    assert '<nav aria-label="Console">' in html
    assert "<footer" in html
    assert 'aria-current="page"' in html
    assert "/static/console/htmx.min.js" in html
    assert "https://" not in html.split("<body")[0]


def test_a_user_without_an_organization_gets_a_403_page(db: None) -> None:
    User.objects.create_user(email="loner@x.test", password=PASSWORD)
    client = Client()
    client.login(username="loner@x.test", password=PASSWORD)
    response = client.get("/console/keys/")
    assert response.status_code == 403
    assert "not a member" in body(response)


# --- API keys ----------------------------------------------------------------------------------


def test_owner_creates_a_key_shown_once(alice: Person) -> None:
    client = logged_in(alice)
    keys_page = body(client.get("/console/keys/"))
    assert 'id="create-key"' in keys_page
    assert '<label for="id_name">' in keys_page
    created = client.post("/console/keys/", {"name": "ci", "scopes": "inference"})
    assert created.status_code == 200
    assert "no-store" in created["Cache-Control"]
    value = key_value(body(created))
    key = APIKey.objects.for_organization(alice.organization).get(name="ci")
    assert key.scopes == ["inference"]
    assert key.member_id == alice.membership.pk
    assert (
        AuditLog.objects.for_organization(alice.organization)
        .filter(action="api_key.created", target_id=key.pk, actor_id=alice.user.pk)
        .exists()
    )
    # It works on the API, and the console never shows the value again.
    assert client_with(value).get("/v1/me").json()["api_key_id"] == key.pk
    listing = body(client.get("/console/keys/"))
    assert key.redacted_value in listing
    assert value not in listing


@pytest.mark.parametrize(
    "fields",
    [{}, {"name": ""}, {"name": "x" * 101}, {"name": "ok", "scopes": "superuser"}],
)
def test_key_creation_refuses_malformed_input(alice: Person, fields: dict[str, str]) -> None:
    response = logged_in(alice).post("/console/keys/", fields)
    assert response.status_code == 400
    assert 'role="alert"' in body(response)
    assert APIKey.objects.for_organization(alice.organization).count() == 1


def test_a_viewer_sees_keys_but_cannot_create_rotate_or_revoke(alice: Person, vera: Person) -> None:
    client = logged_in(vera)
    page = body(client.get("/console/keys/"))
    assert "Default key" in page
    assert 'id="create-key"' not in page
    assert "Create key" not in page
    assert "/revoke" not in page
    assert "/rotate" not in page
    forged = client.post("/console/keys/", {"name": "sneaky", "scopes": "all"})
    assert forged.status_code == 403
    assert "viewer" in body(forged)
    alices = APIKey.objects.for_organization(alice.organization).get(member=alice.membership)
    for action in ("revoke", "rotate"):
        assert client.post(f"/console/keys/{alices.pk}/{action}").status_code == 403
    alices.refresh_from_db()
    assert alices.revoked_at is None
    assert alices.rotated_at is None
    assert not APIKey.objects.for_organization(alice.organization).filter(name="sneaky").exists()


def test_a_developer_cannot_manage_keys_either(bob: Person) -> None:
    # As in the API: key management needs organization.write, which a developer lacks.
    client = logged_in(bob)
    assert 'id="create-key"' not in body(client.get("/console/keys/"))
    assert client.post("/console/keys/", {"name": "b"}).status_code == 403


def test_revoke_with_and_without_htmx(alice: Person) -> None:
    client = logged_in(alice)
    first = key_value(body(client.post("/console/keys/", {"name": "one", "scopes": "all"})))
    one = APIKey.objects.for_organization(alice.organization).get(name="one")
    plain = client.post(f"/console/keys/{one.pk}/revoke")
    assert plain.status_code == 302
    assert plain["Location"] == "/console/keys/"
    assert client_with(first).get("/v1/models").status_code == 401
    key_value(body(client.post("/console/keys/", {"name": "two", "scopes": "all"})))
    two = APIKey.objects.for_organization(alice.organization).get(name="two")
    swapped = client.post(f"/console/keys/{two.pk}/revoke", HTTP_HX_REQUEST="true")
    assert swapped.status_code == 200
    row = body(swapped)
    assert row.startswith(f'<tr id="key-{two.pk}">')
    assert "revoked" in row
    assert "<html" not in row
    two.refresh_from_db()
    assert two.revoked_at is not None


def test_rotate_shows_the_new_key_once(alice: Person) -> None:
    client = logged_in(alice)
    old = APIKey.objects.for_organization(alice.organization).get()
    response = client.post(f"/console/keys/{old.pk}/rotate")
    assert response.status_code == 200
    new_value = key_value(body(response))
    assert old.redacted_value in body(response)
    old.refresh_from_db()
    assert old.rotated_to_id is not None
    assert old.rotated_to_id != old.pk
    assert client_with(new_value).get("/v1/models").status_code == 200
    again = client.post(f"/console/keys/{old.pk}/rotate")
    assert again.status_code == 409
    assert "already rotated" in body(again)


def test_only_post_changes_keys(alice: Person) -> None:
    key = APIKey.objects.for_organization(alice.organization).get()
    client = logged_in(alice)
    assert client.get(f"/console/keys/{key.pk}/revoke").status_code == 405
    assert client.get(f"/console/keys/{key.pk}/rotate").status_code == 405
    key.refresh_from_db()
    assert key.revoked_at is None
    assert key.rotated_at is None


@pytest.mark.parametrize("action", ["revoke", "rotate"])
def test_another_organizations_key_is_a_404_page(
    alice: Person, charlie: Person, action: str
) -> None:
    charlies = APIKey.objects.for_organization(charlie.organization).get()
    client = logged_in(alice)
    for key_id in (charlies.pk, "key_doesnotexist", "%00", "x" * 300):
        response = client.post(f"/console/keys/{key_id}/{action}")
        assert response.status_code == 404, key_id
        assert "<html" in body(response)
        assert "no API key with this id" in body(response)
    charlies.refresh_from_db()
    assert charlies.revoked_at is None
    assert charlies.rotated_at is None


# --- usage and costs ----------------------------------------------------------------------------


def usage(person: Person, model: str, meter: str, quantity: int, at: datetime) -> None:
    ledger_append_many(
        [
            Entry(
                organization_id=person.organization.pk,
                idempotency_key=f"console:{next(_n)}",
                meter=meter,
                quantity=quantity,
                occurred_at=at,
                source="test",
                model=model,
                reference=f"req-{next(_n)}",
            )
        ]
    )


def test_usage_page_charts_tokens_and_costs_by_day_and_model(
    alice: Person, charlie: Person
) -> None:
    now = timezone.now().astimezone(UTC)
    price(Meter.PROMPT_TOKENS, "2.00", now - timedelta(days=60))
    price(Meter.COMPLETION_TOKENS, "4.00", now - timedelta(days=60))
    usage(alice, "tiny-a", Meter.PROMPT_TOKENS, 1000, now - timedelta(days=2))
    usage(alice, "tiny-a", Meter.COMPLETION_TOKENS, 500, now - timedelta(days=2))
    usage(alice, "tiny-b", Meter.PROMPT_TOKENS, 250_000, now)
    usage(alice, "ancient", Meter.PROMPT_TOKENS, 99, now - timedelta(days=31))
    usage(charlie, "globex-model", Meter.PROMPT_TOKENS, 7777, now)
    response = logged_in(alice).get("/console/usage/")
    assert response.status_code == 200
    html = body(response)
    assert 'id="tokens-chart"' in html
    assert 'id="cost-chart"' in html
    assert html.count('<g class="series" data-name="tiny-a" data-points="30">') == 2
    assert html.count('data-name="tiny-b"') == 2
    assert "ancient" not in html
    assert "globex-model" not in html
    assert 'id="total-tokens">251500<' in html
    # 251 000 prompt tokens at $2.00 per million, 500 completion tokens at $4.00.
    assert 'id="total-cost">$0.5040<' in html
    table = html.split('id="usage-table"')[1]
    assert f"<td>{(now - timedelta(days=2)):%Y-%m-%d}</td><td>tiny-a</td>" in table
    assert '<td class="num">1500</td>' in table


def test_usage_page_with_no_usage_says_so(alice: Person) -> None:
    html = body(logged_in(alice).get("/console/usage/"))
    assert "No data yet" in html
    assert 'id="no-usage"' in html
