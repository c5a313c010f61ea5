"""The data-partner catalog: publish, browse, request access, approve, train, earn."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from controlplane.core.errors import NotFound
from controlplane.datasets import catalog
from controlplane.datasets.models import DatasetVersion
from tests.support.people import Person, sign_up

pytestmark = pytest.mark.django_db

ROWS = b"".join(
    json.dumps({"prompt": f"What is {i}+{i}?", "completion": str(2 * i)}).encode() + b"\n"
    for i in range(40)
)


@pytest.fixture
def partner(db: None) -> Person:
    """Dana runs a data partner that sells a math dataset."""
    return sign_up("dana@mathdata.test", "MathData", kinds=["data_partner"])


def ready_version(person: Person, captured: Any) -> str:
    f = io.BytesIO(ROWS)
    f.name = "math.jsonl"
    with captured(execute=True):
        file_id = person.client.post(
            "/v1/files", {"file": f, "purpose": "fine-tune"}, format="multipart"
        ).json()["id"]
    dataset = person.client.post("/v1/datasets", {"name": "math"}, format="json").json()["id"]
    with captured(execute=True):
        version = person.client.post(
            f"/v1/datasets/{dataset}/versions", {"file_ids": [file_id]}, format="json"
        ).json()
    return str(version["id"])


def publish(partner: Person, version_id: str, **extra: Any) -> dict[str, Any]:
    response = partner.client.post(
        "/v1/catalog",
        {
            "dataset_version_id": version_id,
            "title": "Arithmetic drills",
            "license_terms": "Training only; no redistribution.",
            "price_per_1k_tokens": "0.02",
            **extra,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def listing(partner: Person, django_capture_on_commit_callbacks: Any) -> dict[str, Any]:
    return publish(partner, ready_version(partner, django_capture_on_commit_callbacks))


def test_customers_browse_the_catalog_and_see_only_samples(
    listing: dict[str, Any], alice: Person
) -> None:
    browsed = alice.client.get("/v1/catalog").json()["data"]

    assert [entry["id"] for entry in browsed] == [listing["id"]]
    detail = alice.client.get(f"/v1/catalog/{listing['id']}").json()
    assert len(detail["sample_rows"]) == 5
    assert detail["rows"] == 40
    assert detail["price_per_1k_tokens"] == "0.020000"


def test_raw_rows_of_a_partner_version_are_never_downloadable(
    listing: dict[str, Any], alice: Person, partner: Person
) -> None:
    version = listing["dataset_version_id"]
    # Before and after a grant, the customer cannot reach the version or its files.
    for _ in range(2):
        datasets = alice.client.get("/v1/datasets").json()["data"]
        assert datasets == []
        version_row = DatasetVersion.objects.for_organization(partner.organization).get(pk=version)
        for file_id in version_row.source_files:
            assert alice.client.get(f"/v1/files/{file_id}/content").status_code == 404
        grant = alice.client.post(f"/v1/catalog/{listing['id']}/access_requests").json()
        partner.client.post(f"/v1/catalog/access_requests/{grant['id']}/approve")


def test_access_is_requested_then_approved_by_the_partner(
    listing: dict[str, Any], alice: Person, partner: Person
) -> None:
    version = listing["dataset_version_id"]
    request = alice.client.post(
        f"/v1/catalog/{listing['id']}/access_requests", {"note": "for our tutor bot"}, format="json"
    ).json()
    assert request["status"] == "pending"
    with pytest.raises(NotFound):
        catalog.usable_version(organization=alice.organization, version_id=version)

    pending = partner.client.get("/v1/catalog/access_requests?as=partner").json()["data"]
    assert [r["id"] for r in pending] == [request["id"]]
    decided = partner.client.post(f"/v1/catalog/access_requests/{request['id']}/approve")

    assert decided.json()["status"] == "approved"
    assert catalog.usable_version(organization=alice.organization, version_id=version).pk == (
        version
    )
    mine = alice.client.get("/v1/catalog/access_requests").json()["data"]
    assert mine[0]["status"] == "approved"


def test_a_declined_request_grants_nothing(
    listing: dict[str, Any], alice: Person, partner: Person
) -> None:
    request = alice.client.post(f"/v1/catalog/{listing['id']}/access_requests").json()
    partner.client.post(f"/v1/catalog/access_requests/{request['id']}/decline")

    with pytest.raises(NotFound):
        catalog.usable_version(
            organization=alice.organization, version_id=listing["dataset_version_id"]
        )


def test_auto_approval(
    partner: Person, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    listing = publish(
        partner, ready_version(partner, django_capture_on_commit_callbacks), auto_approve=True
    )
    request = alice.client.post(f"/v1/catalog/{listing['id']}/access_requests").json()
    assert request["status"] == "approved"


def test_a_customer_cannot_decide_its_own_request(listing: dict[str, Any], alice: Person) -> None:
    request = alice.client.post(f"/v1/catalog/{listing['id']}/access_requests").json()
    response = alice.client.post(f"/v1/catalog/access_requests/{request['id']}/approve")
    assert response.status_code == 404


def test_only_data_partners_publish(alice: Person, django_capture_on_commit_callbacks: Any) -> None:
    version = ready_version(alice, django_capture_on_commit_callbacks)
    response = alice.client.post(
        "/v1/catalog",
        {
            "dataset_version_id": version,
            "title": "x",
            "license_terms": "x",
            "price_per_1k_tokens": "1",
        },
        format="json",
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "not_a_data_partner"


def test_a_partner_cannot_publish_someone_elses_version(
    partner: Person, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    version = ready_version(alice, django_capture_on_commit_callbacks)
    response = partner.client.post(
        "/v1/catalog",
        {
            "dataset_version_id": version,
            "title": "x",
            "license_terms": "x",
            "price_per_1k_tokens": "1",
        },
        format="json",
    )
    assert response.status_code == 404


def test_unpublished_listings_disappear_for_customers(
    listing: dict[str, Any], alice: Person, partner: Person
) -> None:
    partner.client.patch(f"/v1/catalog/{listing['id']}", {"published": False}, format="json")

    assert alice.client.get("/v1/catalog").json()["data"] == []
    assert alice.client.get(f"/v1/catalog/{listing['id']}").status_code == 404
    assert partner.client.get(f"/v1/catalog/{listing['id']}").status_code == 200


def test_training_on_a_partners_data_credits_the_partner_once(
    listing: dict[str, Any], alice: Person, partner: Person
) -> None:
    request = alice.client.post(f"/v1/catalog/{listing['id']}/access_requests").json()
    partner.client.post(f"/v1/catalog/access_requests/{request['id']}/approve")
    version = catalog.usable_version(
        organization=alice.organization, version_id=listing["dataset_version_id"]
    )

    for _attempt in range(3):  # a job that ran in three attempts reports three times
        catalog.usage_record(
            customer=alice.organization, version=version, job_id="ftjob_1", trained_tokens=250_000
        )

    usage = partner.client.get("/v1/catalog/usage").json()
    assert usage["total_trained_tokens"] == 250_000
    assert usage["total_amount"] == "5.000000"  # 250k tokens at 0.02 per 1k
    assert usage["data"][0]["customer_id"] == alice.organization.pk
    assert alice.client.get("/v1/catalog/usage").json()["data"] == []  # partners only


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"title": "x", "license_terms": "x", "price_per_1k_tokens": "1"}, "dataset_version_id"),
        (
            {
                "dataset_version_id": "dsv_x",
                "title": "x",
                "license_terms": "x",
                "price_per_1k_tokens": "-1",
            },
            "price_per_1k_tokens",
        ),
        (
            {
                "dataset_version_id": "dsv_x",
                "title": "x",
                "license_terms": "x",
                "price_per_1k_tokens": "1",
                "organization": "org_x",
            },
            "organization",
        ),
        (
            {
                "dataset_version_id": "dsv_x",
                "title": "x",
                "license_terms": "x",
                "price_per_1k_tokens": "1",
                "sample_rows": [{"r": i} for i in range(21)],
            },
            "sample_rows",
        ),
    ],
)
def test_malformed_publication_is_400(partner: Person, body: dict[str, Any], param: str) -> None:
    response = partner.client.post("/v1/catalog", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param


def test_the_catalog_needs_a_key(db: None) -> None:
    from rest_framework.test import APIClient

    assert APIClient().get("/v1/catalog").status_code == 401


def test_a_second_partner_sees_nothing_of_the_first(listing: dict[str, Any], alice: Person) -> None:
    other = sign_up("erin@words.test", "Words", kinds=["data_partner"])
    alice.client.post(f"/v1/catalog/{listing['id']}/access_requests")
    assert other.client.get("/v1/catalog/access_requests?as=partner").json()["data"] == []
    assert (
        other.client.patch(
            f"/v1/catalog/{listing['id']}", {"published": False}, format="json"
        ).status_code
        == 404
    )
