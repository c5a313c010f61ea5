"""GET /v1/organization/usage and /costs: OpenAI's bucket shapes, priced at each event's time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from controlplane.billing.ledger import ledger_append_many
from controlplane.billing.models import Meter
from tests.controlplane.billing.factories import entry, price, usage
from tests.support.people import Person, client_with, join

pytestmark = pytest.mark.django_db
DAY0 = datetime(2026, 3, 1, tzinfo=UTC)
T0 = int(DAY0.timestamp())
SINCE = datetime(2024, 1, 1, tzinfo=UTC)


def get(person: Person, path: str, **params: object) -> dict:
    response = person.client.get(path, params)
    assert response.status_code == 200, response.content
    return dict(response.json())


def test_usage_comes_in_daily_buckets_grouped_by_model(alice: Person, charlie: Person) -> None:
    usage(alice, DAY0 + timedelta(hours=1), prompt=10, completion=20, model="a")
    usage(alice, DAY0 + timedelta(hours=2), prompt=1, completion=2, model="a")
    usage(alice, DAY0 + timedelta(days=1, hours=3), prompt=5, completion=0, model="b")
    usage(charlie, DAY0 + timedelta(hours=1), prompt=999, completion=999, model="a")

    page = get(
        alice, "/v1/organization/usage", start_time=T0, end_time=T0 + 3 * 86400, group_by="model"
    )
    assert page["object"] == "page"
    assert page["has_more"] is False
    assert page["next_page"] is None
    assert [b["start_time"] for b in page["data"]] == [T0, T0 + 86400, T0 + 2 * 86400]
    first, second, third = (b["results"] for b in page["data"])
    assert [
        (r["model"], r["input_tokens"], r["output_tokens"], r["num_model_requests"]) for r in first
    ] == [("a", 11, 22, 2)]
    assert [(r["model"], r["input_tokens"], r["output_tokens"]) for r in second] == [("b", 5, 0)]
    assert third == []
    assert first[0]["object"] == "organization.usage.result"
    assert first[0]["api_key_id"] is None  # not grouped by it


def test_usage_groups_by_api_key_and_pages_through_buckets(alice: Person) -> None:
    for hour in range(5):
        usage(
            alice,
            DAY0 + timedelta(hours=hour),
            prompt=1,
            completion=1,
            api_key_id=f"key_{hour % 2}",
        )
    page = get(
        alice,
        "/v1/organization/usage",
        start_time=T0,
        end_time=T0 + 5 * 3600,
        bucket_width="1h",
        limit=2,
        group_by="api_key_id",
    )
    assert len(page["data"]) == 2
    assert page["has_more"] is True
    assert page["data"][1]["results"][0]["api_key_id"] == "key_1"
    seen = 2
    while page["has_more"]:
        page = get(
            alice,
            "/v1/organization/usage",
            start_time=T0,
            end_time=T0 + 5 * 3600,
            bucket_width="1h",
            limit=2,
            page=page["next_page"],
        )
        seen += len(page["data"])
    assert seen == 5
    assert page["data"][-1]["results"][0]["input_tokens"] == 1


def test_a_price_change_never_changes_earlier_costs(alice: Person) -> None:
    price(Meter.PROMPT_TOKENS, "2.00", SINCE)
    usage(alice, DAY0 + timedelta(hours=1), prompt=1_000_000)
    before = get(alice, "/v1/organization/costs", start_time=T0, end_time=T0 + 2 * 86400)

    price(Meter.PROMPT_TOKENS, "5.00", DAY0 + timedelta(days=1))  # a rise from day 2 on
    usage(alice, DAY0 + timedelta(days=1, hours=1), prompt=1_000_000)
    after = get(alice, "/v1/organization/costs", start_time=T0, end_time=T0 + 2 * 86400)

    assert before["data"][0]["results"][0]["amount"] == {"value": 2.0, "currency": "usd"}
    assert after["data"][0]["results"][0]["amount"]["value"] == 2.0
    assert after["data"][1]["results"][0]["amount"]["value"] == 5.0


def test_a_model_price_beats_the_wildcard_and_costs_group_by_line_item(alice: Person) -> None:
    price(Meter.PROMPT_TOKENS, "1.00", SINCE)
    price(Meter.PROMPT_TOKENS, "3.00", SINCE, model="big")
    price(Meter.COMPLETION_TOKENS, "10.00", SINCE)
    usage(alice, DAY0, prompt=1_000_000, completion=100_000, model="big")
    usage(alice, DAY0, prompt=1_000_000, model="small")
    ledger_append_many([entry(alice, Meter.TRAINING_TOKENS, 500_000, DAY0, model="base")])

    page = get(
        alice,
        "/v1/organization/costs",
        start_time=T0,
        end_time=T0 + 86400,
        group_by=["line_item", "model"],
    )
    results = {
        (r["line_item"], r["model"]): r["amount"]["value"] for r in page["data"][0]["results"]
    }
    assert results == {
        (Meter.PROMPT_TOKENS, "big"): 3.0,
        (Meter.PROMPT_TOKENS, "small"): 1.0,
        (Meter.COMPLETION_TOKENS, "big"): 1.0,
        (Meter.TRAINING_TOKENS, "base"): 4.0,  # seeded 8.00 per 1M
    }


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_time"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"start_time": -5}, "start_time"),
        ({"start_time": 10**13}, "start_time"),  # milliseconds, not seconds
        ({"start_time": T0, "end_time": T0}, "end_time"),
        ({"start_time": T0, "bucket_width": "1w"}, "bucket_width"),
        ({"start_time": T0, "bucket_width": "1m", "limit": 1441}, "limit"),
        ({"start_time": T0, "limit": 0}, "limit"),
        ({"start_time": T0, "group_by": "colour"}, "group_by"),
        ({"start_time": T0, "page": T0 + 17}, "page"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/organization/usage", "/v1/organization/costs"])
def test_bad_parameters_are_a_400_naming_the_parameter(
    alice: Person, path: str, params: dict, param: str
) -> None:
    response = alice.client.get(path, params)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


@pytest.mark.parametrize(
    "path",
    ["/v1/organization/usage", "/v1/organization/costs", "/v1/catalog/earnings"],
)
def test_usage_and_costs_need_a_key_with_billing_read(alice: Person, path: str) -> None:
    assert client_with(None).get(path, {"start_time": T0}).status_code == 401
    assert client_with("sk-not-a-key").get(path, {"start_time": T0}).status_code == 401
    developer = join(alice.organization, "dev@acme.test", "developer")
    response = developer.client.get(path, {"start_time": T0})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"
    accountant = join(alice.organization, "billing@acme.test", "billing")
    assert accountant.client.get(path, {"start_time": T0}).status_code == 200


def test_an_outsider_sees_none_of_another_tenants_usage_or_costs(
    alice: Person, charlie: Person
) -> None:
    usage(alice, DAY0, prompt=100, completion=100)
    for path in ("/v1/organization/usage", "/v1/organization/costs"):
        page = get(charlie, path, start_time=T0, end_time=T0 + 86400)
        assert page["data"][0]["results"] == []


def test_partners_see_royalties_per_listing_at_the_price_they_were_earned(
    alice: Person,
) -> None:
    from controlplane.billing import meters

    for job, tokens, price_1k in (("ftjob-1", 4000, "0.50"), ("ftjob-2", 1000, "1.00")):
        meters.royalty_to_ledger(
            partner_id=alice.organization.pk,
            listing_id="lst_a",
            job_id=job,
            customer_id="org_c",
            trained_tokens=tokens,
            price_per_1k_tokens=Decimal(price_1k),
            at=DAY0 + timedelta(hours=2),
        )
    page = get(alice, "/v1/catalog/earnings", start_time=T0, end_time=T0 + 86400)
    (result,) = page["data"][0]["results"]
    assert result["listing_id"] == "lst_a"
    assert result["trained_tokens"] == 5000
    assert result["num_jobs"] == 2
    assert result["amount"] == {"value": 3.0, "currency": "usd"}
    # Earnings are not charges: the partner's costs stay empty.
    assert (
        get(alice, "/v1/organization/costs", start_time=T0, end_time=T0 + 86400)["data"][0][
            "results"
        ]
        == []
    )
