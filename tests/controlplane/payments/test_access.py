"""ainference_refusal: the org's billing standing through dunning, grace and payment."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone

from controlplane.payments import access
from controlplane.payments.models import StripeCustomer
from tests.support.localstripe import API_KEY, WEBHOOK_SECRET
from tests.support.people import Person

from . import events

#: As a sync caller runs it (its database look-up on this thread, in the test's transaction).
inference_refusal = async_to_sync(access.ainference_refusal)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _stripe_on(settings: Any) -> None:
    settings.STRIPE_API_KEY = API_KEY
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET


@pytest.fixture
def customer(alice: Person) -> str:
    StripeCustomer.objects.create(organization=alice.organization, stripe_id="cus_alice")
    return "cus_alice"


def fail(customer: str, invoice_id: str = "in_1", at: int | None = None) -> None:
    evt = events.event("invoice.payment_failed", events.invoice(invoice_id, customer), created=at)
    assert events.deliver(evt).status_code == 200


def pay(customer: str, invoice_id: str = "in_1") -> None:
    evt = events.event("invoice.paid", events.invoice(invoice_id, customer))
    assert events.deliver(evt).status_code == 200


def test_an_organization_in_good_standing_is_served(alice: Person) -> None:
    assert inference_refusal(alice.organization.pk) is None


def test_inference_runs_through_the_grace_period_and_stops_after_it(
    alice: Person, customer: str
) -> None:
    fail(customer)
    now = timezone.now()
    org = alice.organization.pk
    assert inference_refusal(org, now=now) is None
    assert inference_refusal(org, now=now + timedelta(days=6, hours=23)) is None
    error = inference_refusal(org, now=now + timedelta(days=7, minutes=1))
    assert error is not None
    assert error.status_code == 402
    assert error.code == "billing_suspended"
    message = str(error.detail)
    assert "in_1" in message
    assert "https://invoice.stripe.test/in_1" in message
    assert "29.00 USD" in message


def test_payment_restores_service_at_once_in_this_process(
    alice: Person, customer: str, django_capture_on_commit_callbacks: Any
) -> None:
    fail(customer, at=int(time.time()) - 8 * 86400)
    org = alice.organization.pk
    assert inference_refusal(org) is not None  # now cached
    with django_capture_on_commit_callbacks(execute=True):
        pay(customer)
    assert inference_refusal(org) is None


def test_another_process_sees_the_payment_within_the_cache_lifetime(
    alice: Person, customer: str, settings: Any
) -> None:
    settings.PAYMENTS_STANDING_CACHE_SECONDS = 0.2
    fail(customer, at=int(time.time()) - 8 * 86400)
    org = alice.organization.pk
    assert inference_refusal(org) is not None
    # Resolved by "another process": a direct write that does not touch this cache.
    from controlplane.payments.models import Dunning

    Dunning.objects.for_organization(org).update(resolved_at=timezone.now())
    assert inference_refusal(org) is not None  # still cached
    time.sleep(0.25)
    assert inference_refusal(org) is None


def test_the_oldest_unpaid_invoice_is_named(
    alice: Person, customer: str, django_capture_on_commit_callbacks: Any
) -> None:
    t = int(time.time())
    fail(customer, "in_new", at=t - 9 * 86400)
    fail(customer, "in_old", at=t - 10 * 86400)
    error = inference_refusal(alice.organization.pk)
    assert error is not None
    assert "in_old" in str(error.detail)
    with django_capture_on_commit_callbacks(execute=True):
        pay(customer, "in_old")
    error = inference_refusal(alice.organization.pk)
    assert error is not None
    assert "in_new" in str(error.detail)


def test_dunning_is_per_organization(alice: Person, charlie: Person, customer: str) -> None:
    fail(customer, at=int(time.time()) - 8 * 86400)
    assert inference_refusal(alice.organization.pk) is not None
    assert inference_refusal(charlie.organization.pk) is None


def test_the_grace_period_is_a_setting(alice: Person, customer: str, settings: Any) -> None:
    settings.PAYMENTS_DUNNING_GRACE_DAYS = 1
    fail(customer)
    now = timezone.now()
    assert inference_refusal(alice.organization.pk, now=now + timedelta(hours=23)) is None
    assert inference_refusal(alice.organization.pk, now=now + timedelta(hours=25))


@pytest.mark.django_db(transaction=True)
def test_on_an_event_loop_it_gives_the_same_answers(alice: Person, customer: str) -> None:
    fail(customer)
    org = alice.organization.pk
    later = timezone.now() + timedelta(days=8)
    assert asyncio.run(access.ainference_refusal(org)) is None
    error = asyncio.run(access.ainference_refusal(org, now=later))
    assert error is not None
    assert error.code == "billing_suspended"
