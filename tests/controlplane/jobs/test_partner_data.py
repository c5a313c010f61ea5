"""A job on a data partner's licensed version: allowed only with a grant, credited once."""

from __future__ import annotations

import time
from typing import Any

import pytest

from controlplane.billing.models import LedgerEntry, Meter
from jobcontracts import training as contract
from tests.controlplane.datasets.test_catalog import publish, ready_version
from tests.support.jobs import TINY_LLAMA, Worker, create_job, register_tiny_llama
from tests.support.people import Person, sign_up

pytestmark = pytest.mark.django_db


@pytest.fixture
def partner(db: None) -> Person:
    return sign_up("dana@mathdata.test", "MathData", kinds=["data_partner"])


def test_a_granted_partner_version_trains_and_credits_the_partner_once(
    alice: Person, partner: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama()
    listing = publish(partner, ready_version(partner, captured), auto_approve=True)
    version = listing["dataset_version_id"]

    refused = create_job(alice, captured, model=TINY_LLAMA, dataset=version)
    assert refused.status_code == 404  # no grant yet: as if it did not exist
    alice.client.post(f"/v1/catalog/{listing['id']}/access_requests")

    response = create_job(alice, captured, model=TINY_LLAMA, dataset=version)
    assert response.status_code == 200, response.content
    job = response.json()
    assert job["dataset"] == version
    assert job["training_file"] is None
    worker = Worker(job["id"], 1)
    with captured(execute=True):
        worker.report(contract.STARTED, total_steps=2)
        for _ in range(2):  # a duplicated success report credits nothing more
            worker.report(
                contract.SUCCEEDED, step=2, trained_tokens=50_000, artifact_uri=worker.uri("final")
            )
            worker.seq += 5

    usage = partner.client.get("/v1/catalog/usage").json()
    assert usage["total_trained_tokens"] == 50_000
    assert usage["total_amount"] == "1.000000"  # 50k tokens at 0.02 per 1k
    (row,) = usage["data"]
    assert (row["job_id"], row["customer_id"]) == (job["id"], alice.organization.pk)
    # The ledger holds it once, as the partner's royalty, and the earnings API shows it.
    royalties = LedgerEntry.objects.for_organization(partner.organization).filter(
        meter=Meter.ROYALTY_TOKENS
    )
    assert list(royalties.values_list("quantity", flat=True)) == [50_000]
    earnings = partner.client.get(
        "/v1/catalog/earnings", {"start_time": int(time.time()) - 86_400, "bucket_width": "1d"}
    ).json()
    results = [r for bucket in earnings["data"] for r in bucket["results"]]
    assert [(r["trained_tokens"], r["amount"]["value"]) for r in results] == [(50_000, 1.0)]


def test_a_customer_without_a_grant_cannot_train_on_partner_rows(
    alice: Person, partner: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama()
    listing = publish(partner, ready_version(partner, captured))  # approval needed
    alice.client.post(f"/v1/catalog/{listing['id']}/access_requests")  # still pending

    response = create_job(alice, captured, model=TINY_LLAMA, dataset=listing["dataset_version_id"])
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "dataset"
