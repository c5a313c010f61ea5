"""The endpoints: a key's limits, the caller's rate limits, budgets. Bad input of every kind."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from controlplane.accounts import services as account_services
from controlplane.billing.models import Plan
from controlplane.limits.models import Budget
from tests.support.budgets import reserve, settle
from tests.support.people import Person, client_with, join

pytestmark = pytest.mark.django_db


def _key_id(person: Person) -> str:
    return str(person.membership.api_keys.get().pk)


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def _scoped_key(person: Person, scopes: list[str]) -> str:
    return account_services._issue(
        organization=person.organization,
        name="narrow",
        scopes=scopes,
        member=person.membership,
        created_by=person.user,
    ).value


# --- /v1/organization/api_keys/{id}/limits -------------------------------------------------


def test_owner_reads_a_keys_limits_from_the_plan(alice: Person, free_plan: Plan) -> None:
    body = alice.client.get(f"/v1/organization/api_keys/{_key_id(alice)}/limits").json()
    assert body["plan"] == "free"
    assert body["overrides"] == {
        "requests_per_minute": None,
        "tokens_per_minute": None,
        "requests_per_day": None,
    }
    assert body["effective"] == {
        "requests_per_minute": 20,
        "tokens_per_minute": 40_000,
        "requests_per_day": 1_000,
    }


def test_a_per_key_override_beats_the_plan_and_null_goes_back_to_it(
    alice: Person, bob: Person, free_plan: Plan
) -> None:
    url = f"/v1/organization/api_keys/{_key_id(bob)}/limits"
    body = alice.client.put(url, {"requests_per_minute": 3}, format="json").json()
    assert body["effective"]["requests_per_minute"] == 3
    assert body["effective"]["tokens_per_minute"] == 40_000  # not overridden: the plan's

    # Bob's key now runs out after 3 requests although the plan allows 20.
    for _ in range(3):
        assert bob.client.get("/v1/organization/rate_limits").status_code == 200
    error = _error(bob.client.get("/v1/organization/rate_limits"), 429, "rate_limit_exceeded")
    assert "API key's requests/min limit (3)" in error["message"]
    assert alice.client.get("/v1/organization/rate_limits").status_code == 200  # her key is not

    body = alice.client.put(url, {}, format="json").json()  # PUT replaces: all back to the plan
    assert body["effective"]["requests_per_minute"] == 20


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": -5}, "requests_per_minute"),
        ({"requests_per_minute": "many"}, "requests_per_minute"),
        ({"tokens_per_minute": 10**12}, "tokens_per_minute"),
        ({"requests_per_day": 1.5}, "requests_per_day"),
        ({"requests_per_hour": 5}, "requests_per_hour"),
        ([1, 2], None),
    ],
)
def test_bad_limits_are_a_400_naming_the_field(
    alice: Person, free_plan: Plan, body: Any, param: str | None
) -> None:
    response = alice.client.put(
        f"/v1/organization/api_keys/{_key_id(alice)}/limits", body, format="json"
    )
    error = _error(response, 400, "invalid_value")
    assert error["param"] == param


def test_malformed_json_is_a_400(alice: Person) -> None:
    response = alice.client.generic(
        "PUT",
        f"/v1/organization/api_keys/{_key_id(alice)}/limits",
        "{not json",
        content_type="application/json",
    )
    _error(response, 400, "invalid_json")


def test_an_oversized_body_is_refused(alice: Person, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = alice.client.generic(
        "PUT",
        f"/v1/organization/api_keys/{_key_id(alice)}/limits",
        '{"requests_per_minute": 5, "x": "' + "a" * 2000 + '"}',
        content_type="application/json",
    )
    _error(response, 413, "request_too_large")


def test_a_developer_can_read_but_not_set_limits(alice: Person, bob: Person) -> None:
    url = f"/v1/organization/api_keys/{_key_id(bob)}/limits"
    assert bob.client.get(url).status_code == 200
    error = _error(
        bob.client.put(url, {"requests_per_minute": 1000}, format="json"), 403, "missing_scope"
    )
    assert "organization.write" in error["message"]


def test_limits_need_an_api_key(alice: Person) -> None:
    url = f"/v1/organization/api_keys/{_key_id(alice)}/limits"
    _error(client_with(None).get(url), 401, "missing_api_key")
    _error(client_with("atl_live_nope").put(url, {}, format="json"), 401, "invalid_api_key")
    _error(client_with(None).get("/v1/organization/rate_limits"), 401, "missing_api_key")
    _error(client_with(None).get("/v1/organization/budgets"), 401, "missing_api_key")


def test_outsider_cannot_read_or_set_a_foreign_keys_limits(alice: Person, charlie: Person) -> None:
    url = f"/v1/organization/api_keys/{_key_id(alice)}/limits"
    _error(charlie.client.get(url), 404, "not_found")
    _error(charlie.client.put(url, {"requests_per_minute": 1}, format="json"), 404, "not_found")
    assert alice.client.get(url).json()["overrides"]["requests_per_minute"] is None


# --- /v1/organization/rate_limits ----------------------------------------------------------


def test_rate_limits_show_what_is_left_and_count_as_a_request(
    alice: Person, free_plan: Plan
) -> None:
    first = alice.client.get("/v1/organization/rate_limits")
    assert first.status_code == 200
    assert first["x-ratelimit-limit-requests"] == "20"
    assert first["x-ratelimit-remaining-requests"] == "19"
    assert first["x-ratelimit-reset-requests"] in ("3s", "2.999s")
    assert first["x-ratelimit-limit-tokens"] == "40000"
    assert first["x-ratelimit-remaining-tokens"] == "40000"
    windows = {(w["scope"], w["unit"], w["per"]): w for w in first.json()["data"]}
    assert windows[("key", "requests", "minute")]["remaining"] == 19
    assert windows[("organization", "requests", "day")]["remaining"] == 999
    second = alice.client.get("/v1/organization/rate_limits")
    assert second["x-ratelimit-remaining-requests"] == "18"


def test_the_429_says_which_limit_and_when_to_retry_with_headers(
    alice: Person, bob: Person, free_plan: Plan
) -> None:
    free_plan.requests_per_minute = 2
    free_plan.save()
    alice.client.get("/v1/organization/rate_limits")
    bob.client.get("/v1/organization/rate_limits")
    response = alice.client.get("/v1/organization/rate_limits")
    error = _error(response, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    # Each key has had one of its two; the organization's two are gone.
    assert "organization's requests/min limit (2)" in error["message"]
    assert int(response["Retry-After"]) == 30
    assert response["x-ratelimit-remaining-requests"] == "0"


def test_rate_limits_need_organization_read(alice: Person) -> None:
    narrow = client_with(_scoped_key(alice, ["models.read"]))
    _error(narrow.get("/v1/organization/rate_limits"), 403, "missing_scope")


# --- /v1/organization/budgets --------------------------------------------------------------


def _create(person: Person, **body: Any) -> Any:
    return person.client.post("/v1/organization/budgets", body, format="json")


def test_owner_creates_lists_reads_updates_and_deletes_a_budget(alice: Person) -> None:
    created = _create(
        alice, name="team", amount="25.50", kind="soft", alert_thresholds=[90, 50, 50]
    )
    assert created.status_code == 201, created.content
    budget = created.json()
    assert budget["amount"] == "25.5"
    assert budget["alert_thresholds"] == [50, 90]
    assert budget["period"] == "month"
    assert budget["current_period"]["spent"] == "0.000000"

    r = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=Decimal("2"))
    settle(r, Decimal("1.25"))
    read = alice.client.get(f"/v1/organization/budgets/{budget['id']}").json()
    assert read["current_period"]["spent"] == "1.250000"

    listed = alice.client.get("/v1/organization/budgets").json()
    assert [b["id"] for b in listed["data"]] == [budget["id"]]

    patched = alice.client.patch(
        f"/v1/organization/budgets/{budget['id']}",
        {"amount": "1", "kind": "hard", "period": "days", "period_days": 7},
        format="json",
    ).json()
    assert (patched["amount"], patched["kind"], patched["period_days"]) == ("1", "hard", 7)

    deleted = alice.client.delete(f"/v1/organization/budgets/{budget['id']}")
    assert deleted.json() == {
        "object": "organization.budget.deleted",
        "id": budget["id"],
        "deleted": True,
    }
    assert not Budget.objects.for_organization(alice.organization).exists()


def test_a_budget_for_one_key(alice: Person) -> None:
    key = _key_id(alice)
    created = _create(alice, amount="3", api_key_id=key)
    assert created.status_code == 201, created.content
    assert created.json()["api_key_id"] == key


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "amount"),
        ({"amount": "0"}, "amount"),
        ({"amount": "-1"}, "amount"),
        ({"amount": "lots"}, "amount"),
        ({"amount": "1000000.01"}, "amount"),
        ({"amount": "1.0000001"}, "amount"),
        ({"amount": "1", "kind": "firm"}, "kind"),
        ({"amount": "1", "period": "week"}, "period"),
        ({"amount": "1", "period": "days"}, "period_days!"),
        ({"amount": "1", "period": "days", "period_days": 0}, "period_days"),
        ({"amount": "1", "period_days": 3}, "period_days!"),
        ({"amount": "1", "alert_thresholds": [101]}, "alert_thresholds.0"),
        ({"amount": "1", "alert_thresholds": list(range(1, 12))}, "alert_thresholds"),
        ({"amount": "1", "anchor": "yesterday"}, "anchor"),
        ({"amount": "1", "name": "n" * 101}, "name"),
        ({"amount": "1", "organization": "org_x"}, "organization"),
    ],
)
def test_bad_budgets_are_a_400_naming_the_field(
    alice: Person, body: dict[str, Any], param: str
) -> None:
    # "!": a rule across fields (code invalid_request), not one field's own validation.
    code = "invalid_request" if param.endswith("!") else "invalid_value"
    error = _error(_create(alice, **body), 400, code)
    assert error["param"] == param.rstrip("!")
    assert error["message"]


def test_a_budget_cannot_move_to_another_key(alice: Person) -> None:
    budget = _create(alice, amount="3").json()
    response = alice.client.patch(
        f"/v1/organization/budgets/{budget['id']}", {"api_key_id": _key_id(alice)}, format="json"
    )
    assert _error(response, 400, "invalid_value")["param"] == "api_key_id"


def test_budgets_need_billing_scopes(alice: Person, bob: Person) -> None:
    billing = join(alice.organization, "billy@acme.test", "billing")
    assert _create(billing, amount="5").status_code == 201
    assert billing.client.get("/v1/organization/budgets").status_code == 200
    _error(bob.client.get("/v1/organization/budgets"), 403, "missing_scope")
    error = _error(_create(bob, amount="5"), 403, "missing_scope")
    assert "billing.write" in error["message"]
    reader = client_with(_scoped_key(alice, ["billing.read"]))
    assert reader.get("/v1/organization/budgets").status_code == 200
    _error(
        reader.post("/v1/organization/budgets", {"amount": "1"}, format="json"),
        403,
        "missing_scope",
    )


def test_outsider_gets_404_for_a_foreign_budget_and_a_foreign_key(
    alice: Person, charlie: Person
) -> None:
    budget = _create(alice, amount="3").json()
    url = f"/v1/organization/budgets/{budget['id']}"
    _error(charlie.client.get(url), 404, "not_found")
    _error(charlie.client.patch(url, {"amount": "1000"}, format="json"), 404, "not_found")
    _error(charlie.client.delete(url), 404, "not_found")
    _error(_create(charlie, amount="3", api_key_id=_key_id(alice)), 404, "not_found")
    assert alice.client.get(url).json()["amount"] == "3"
    assert charlie.client.get("/v1/organization/budgets").json()["data"] == []


def test_a_hard_budget_refusal_is_insufficient_quota_not_rate_limited(alice: Person) -> None:
    from controlplane.limits.budgets import InsufficientQuota
    from controlplane.limits.ratelimit import Limits, RateLimitExceeded, acheck

    check = async_to_sync(acheck)

    _create(alice, amount="1")
    r = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=Decimal("1"))
    settle(r, Decimal("1"))
    with pytest.raises(InsufficientQuota) as quota:
        reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=Decimal("0.1"))
    limits = Limits(key_requests_per_minute=1)
    check(organization_id=alice.organization.pk, api_key_id="k", tokens=0, limits=limits)
    with pytest.raises(RateLimitExceeded) as rate:
        check(organization_id=alice.organization.pk, api_key_id="k", tokens=0, limits=limits)
    assert (quota.value.status_code, rate.value.status_code) == (429, 429)
    assert quota.value.code == "insufficient_quota"
    assert rate.value.code == "rate_limit_exceeded"
    assert not isinstance(quota.value, RateLimitExceeded)
