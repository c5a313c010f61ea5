"""Webhooks: the API, signed deliveries to a real local receiver when jobs and batches end,
retries and the delivery log, and the SSRF guard of production settings."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from controlplane.batches import services as batch_services
from controlplane.batches.models import Batch
from controlplane.billing.invoicing import invoice_status_advance
from controlplane.billing.models import Invoice, InvoiceStatus
from controlplane.datasets.models import File
from controlplane.jobs.models import Job
from controlplane.limits.services import budget_create
from controlplane.notifications.events import EVENT_TYPES
from controlplane.notifications.models import WebhookDelivery
from controlplane.notifications.urlcheck import UrlRefused, url_parse
from controlplane.payments.webhooks import event_process as stripe_event_process
from tests.support.budgets import reserve, settle
from tests.support.cross_tenant import make_batch, make_compression_job, make_evaluation, make_job
from tests.support.people import SYSTEM, Person, client_with, join

pytestmark = pytest.mark.django_db

PRODUCTION = override_settings(WEBHOOK_ALLOW_PRIVATE_URLS=False)


@dataclass
class Receiver:
    """A tiny HTTP server on 127.0.0.1 answering the scripted statuses in turn (then 200)."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    delay: float = 0.0  # seconds before answering
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            state.received.append((dict(self.headers.items()), self.rfile.read(length)))
            status = state.statuses.pop(0) if state.statuses else 200
            time.sleep(state.delay)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _create(person: Person, **body: Any) -> Any:
    return person.client.post("/v1/webhooks", body, format="json")


def _verify(secret: str, headers: dict[str, str], payload: bytes) -> None:
    parts = dict(p.split("=", 1) for p in headers["Atelier-Signature"].split(","))
    expected = hmac.new(
        secret.encode(), f"{parts['t']}.".encode() + payload, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)


def _deliveries(person: Person, webhook_id: str) -> list[dict[str, Any]]:
    body = person.client.get(f"/v1/webhooks/{webhook_id}/deliveries").json()
    return sorted(body["data"], key=lambda d: d["attempt"])


def test_the_webhook_api_creates_lists_updates_rotates_and_deletes(alice: Person) -> None:
    created = _create(alice, url="https://93.184.216.34/hook", events=["batch.completed"])
    assert created.status_code == 201, created.content
    hook = created.json()
    assert hook["secret"].startswith("whsec_")
    assert hook["events"] == ["batch.completed"]
    assert hook["enabled"] is True
    url = f"/v1/webhooks/{hook['id']}"

    got = alice.client.get(url).json()
    assert "secret" not in got  # shown once
    second = _create(alice, url="https://93.184.216.34/other", events=["*"]).json()
    page = alice.client.get("/v1/webhooks?limit=1").json()
    assert page["object"] == "list"
    assert page["has_more"] is True
    assert [w["id"] for w in page["data"]] == [second["id"]]
    rest = alice.client.get(f"/v1/webhooks?after={page['last_id']}").json()
    assert [w["id"] for w in rest["data"]] == [hook["id"]]
    assert rest["has_more"] is False

    changed = alice.client.post(
        url, {"events": ["invoice.paid", "invoice.paid"], "enabled": False}, format="json"
    ).json()
    assert changed["events"] == ["invoice.paid"]
    assert changed["enabled"] is False
    rotated = alice.client.post(f"{url}/rotate_secret").json()
    assert rotated["secret"].startswith("whsec_")
    assert rotated["secret"] != hook["secret"]

    assert alice.client.delete(url).json() == {
        "object": "webhook.deleted",
        "id": hook["id"],
        "deleted": True,
    }
    assert alice.client.get(url).status_code == 404
    logged = alice.client.get("/v1/organization/audit_logs?limit=100").json()["data"]
    assert [e["type"] for e in logged if e["target"]["id"] == hook["id"]] == [
        "webhook.deleted",
        "webhook.secret_rotated",
        "webhook.updated",
        "webhook.created",
    ]


def test_a_cancelled_job_sends_a_signed_event_to_the_receiver(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    hook = _create(alice, url=receiver.url, events=["fine_tuning.job.cancelled"]).json()
    other = _create(alice, url=receiver.url, events=["batch.completed"]).json()
    job_id = make_job(alice)

    with django_capture_on_commit_callbacks(execute=True):
        response = alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert response.json()["status"] == "cancelled"

    assert len(receiver.received) == 1  # only the webhook that asked for it
    headers, payload = receiver.received[0]
    _verify(hook["secret"], headers, payload)
    event = json.loads(payload)
    assert event["type"] == "fine_tuning.job.cancelled"
    assert event["id"].startswith("evt_")
    assert isinstance(event["created"], int)
    assert event["organization_id"] == alice.organization.pk
    assert event["data"]["object"]["id"] == job_id
    assert event["data"]["object"]["status"] == "cancelled"
    [log] = _deliveries(alice, hook["id"])
    assert log["event_id"] == event["id"]
    assert log["event_type"] == event["type"]
    assert (log["attempt"], log["status_code"], log["outcome"]) == (1, 200, "succeeded")
    assert log["next_retry_at"] is None
    assert log["error"] is None
    assert _deliveries(alice, other["id"]) == []


@pytest.mark.parametrize(
    ("make", "cancel", "event_type"),
    [
        (make_compression_job, "/v1/compression/jobs/{}/cancel", "compression.job.cancelled"),
        (make_evaluation, "/v1/evaluations/{}/cancel", "evaluation.job.cancelled"),
    ],
)
def test_compression_and_evaluation_jobs_send_their_own_types(
    alice: Person,
    receiver: Receiver,
    django_capture_on_commit_callbacks: Any,
    make: Any,
    cancel: str,
    event_type: str,
) -> None:
    hook = _create(alice, url=receiver.url, events=[event_type]).json()
    job_id = make(alice)
    Job.objects.for_organization(alice.organization).filter(pk=job_id).update(status="running")
    with django_capture_on_commit_callbacks(execute=True):
        assert alice.client.post(cancel.format(job_id)).status_code == 200
    [(headers, payload)] = receiver.received
    _verify(hook["secret"], headers, payload)
    event = json.loads(payload)
    assert event["type"] == event_type
    assert event["data"]["object"]["id"] == job_id


def test_a_cancelled_batch_sends_batch_cancelled(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    hook = _create(alice, url=receiver.url, events=["batch.cancelled"]).json()
    batch_id = make_batch(alice)
    with django_capture_on_commit_callbacks(execute=True):  # the cancel runs the runner
        assert alice.client.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    assert alice.client.get(f"/v1/batches/{batch_id}").json()["status"] == "cancelled"
    [(headers, payload)] = receiver.received
    _verify(hook["secret"], headers, payload)
    event = json.loads(payload)
    assert event["type"] == "batch.cancelled"
    assert event["data"]["object"]["status"] == "cancelled"


def test_a_batch_that_fails_sends_batch_failed(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    hook = _create(alice, url=receiver.url, events=["*"]).json()
    batch = Batch.objects.for_organization(alice.organization).get(pk=make_batch(alice))
    File.objects.for_organization(alice.organization).filter(pk=batch.input_file_id).update(
        status="error", status_details="is not JSON"
    )
    batch.refresh_from_db()

    with django_capture_on_commit_callbacks(execute=True):
        assert batch_services.batch_load_lines(batch=batch) is False
        batch_services.batch_fail(batch=batch, code="x", message="again")  # already failed

    [(headers, payload)] = receiver.received
    _verify(hook["secret"], headers, payload)
    event = json.loads(payload)
    assert event["type"] == "batch.failed"
    assert event["data"]["object"]["id"] == batch.pk
    assert event["data"]["object"]["status"] == "failed"


def _delivered(kind: str, outcome: str) -> float:
    from controlplane.core import metrics

    return float(metrics.WEBHOOK_DELIVERIES.labels(type=kind, outcome=outcome)._value.get())


def test_a_500_is_retried_and_the_log_shows_both_attempts(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    receiver.statuses = [500]
    hook = _create(alice, url=receiver.url, events=["fine_tuning.job.cancelled"]).json()
    job_id = make_job(alice)
    before = {o: _delivered("fine_tuning.job.cancelled", o) for o in ("retrying", "succeeded")}

    with django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")

    assert len(receiver.received) == 2
    # Each attempt is counted for the metrics: one retrying, one succeeded.
    assert {o: _delivered("fine_tuning.job.cancelled", o) - n for o, n in before.items()} == {
        "retrying": 1.0,
        "succeeded": 1.0,
    }
    first, second = (json.loads(body) for _, body in receiver.received)
    assert first["id"] == second["id"]  # the same event, sent again
    for headers, body in receiver.received:
        _verify(hook["secret"], headers, body)
    one, two = _deliveries(alice, hook["id"])
    assert (one["attempt"], one["status_code"], one["outcome"]) == (1, 500, "retrying")
    assert one["next_retry_at"] is not None
    assert one["next_retry_at"] >= one["created_at"] + 10
    assert one["error"] == "HTTP 500"
    assert (two["attempt"], two["status_code"], two["outcome"]) == (2, 200, "succeeded")


def test_a_400_is_recorded_as_failed_and_not_retried(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    receiver.statuses = [400, 200]
    hook = _create(alice, url=receiver.url, events=["*"]).json()
    job_id = make_job(alice)

    with django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")

    assert len(receiver.received) == 1
    [log] = _deliveries(alice, hook["id"])
    assert (log["attempt"], log["status_code"], log["outcome"]) == (1, 400, "failed")
    assert log["next_retry_at"] is None


@override_settings(WEBHOOK_RETRY_DELAYS_SECONDS=(0.0, 0.0))
def test_an_unreachable_receiver_is_retried_up_to_the_last_attempt(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    hook = _create(alice, url="http://127.0.0.1:9/closed", events=["*"]).json()
    job_id = make_job(alice)

    with django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")

    logs = _deliveries(alice, hook["id"])
    assert [(d["attempt"], d["outcome"]) for d in logs] == [
        (1, "retrying"),
        (2, "retrying"),
        (3, "failed"),
    ]
    assert all(d["status_code"] is None and "ConnectError" in d["error"] for d in logs)


@override_settings(WEBHOOK_TIMEOUT_SECONDS=0.2, WEBHOOK_RETRY_DELAYS_SECONDS=(0.0,))
def test_a_receiver_that_does_not_answer_in_time_is_retried(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    receiver.delay = 0.5
    hook = _create(alice, url=receiver.url, events=["*"]).json()
    job_id = make_job(alice)
    with django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    logs = _deliveries(alice, hook["id"])
    assert [(d["attempt"], d["outcome"], d["error"]) for d in logs] == [
        (1, "retrying", "timed out"),
        (2, "failed", "timed out"),
    ]


def test_a_redirect_is_not_followed(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    receiver.statuses = [302]
    hook = _create(alice, url=receiver.url, events=["*"]).json()
    job_id = make_job(alice)
    with django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert len(receiver.received) == 1
    [log] = _deliveries(alice, hook["id"])
    assert (log["status_code"], log["outcome"]) == (302, "failed")


def test_a_disabled_webhook_gets_nothing(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    hook = _create(alice, url=receiver.url, events=["*"]).json()
    alice.client.post(f"/v1/webhooks/{hook['id']}", {"enabled": False}, format="json")
    job_id = make_job(alice)
    with django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert receiver.received == []


def test_a_budget_threshold_and_invoice_changes_are_sent(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    hook = _create(
        alice,
        url=receiver.url,
        events=[
            "budget.threshold_reached",
            "invoice.finalized",
            "invoice.paid",
            "invoice.payment_failed",
        ],
    ).json()
    budget = budget_create(
        organization=alice.organization,
        api_key=None,
        name="team",
        amount=Decimal("10"),
        kind="soft",
        period="month",
        period_days=None,
        anchor=None,
        alert_thresholds=[50],
        actor=SYSTEM,
    )
    with django_capture_on_commit_callbacks(execute=True):
        settle(
            reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=Decimal("6")),
            Decimal("6"),
        )
    now = timezone.now()
    invoice = Invoice.objects.create(
        organization=alice.organization,
        period_start=now - timedelta(days=30),
        period_end=now,
        subtotal=Decimal("12.50"),
        total=Decimal("12.50"),
    )
    with django_capture_on_commit_callbacks(execute=True):
        for status in (InvoiceStatus.OPEN, InvoiceStatus.OPEN, InvoiceStatus.PAID):
            invoice_status_advance(
                organization=alice.organization, invoice_id=invoice.pk, status=status
            )
        stripe_event_process(
            {
                "id": "evt_stripe_failed_1",
                "type": "invoice.payment_failed",
                "created": int(now.timestamp()),
                "data": {
                    "object": {
                        "id": "in_test_1",
                        "object": "invoice",
                        "customer": None,
                        "metadata": {
                            "organization_id": alice.organization.pk,
                            "atelier_invoice_id": invoice.pk,
                        },
                        "amount_due": 1250,
                        "currency": "usd",
                        "attempt_count": 1,
                        "status": "open",
                    }
                },
            }
        )

    events = []
    for headers, payload in receiver.received:
        _verify(hook["secret"], headers, payload)
        events.append(json.loads(payload))
    assert [e["type"] for e in events] == [
        "budget.threshold_reached",
        "invoice.finalized",  # once: the second `open` changed nothing
        "invoice.paid",
        "invoice.payment_failed",
    ]
    alert = events[0]["data"]["object"]
    assert (alert["budget_id"], alert["threshold"]) == (budget.pk, 50)
    assert Decimal(alert["spent"]) == 6
    assert events[1]["data"]["object"]["id"] == invoice.pk
    assert events[2]["data"]["object"]["status"] == "paid"
    assert events[3]["data"]["object"]["stripe_invoice_id"] == "in_test_1"


# --- the SSRF guard (production settings) ---------------------------------------------------


@PRODUCTION
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1/hook", "https://"),
        ("http://10.0.0.1/hook", "https://"),
        ("http://93.184.216.34/hook", "https://"),
        ("https://localhost/hook", "resolves to"),
        ("https://[::1]/hook", "resolves to ::1"),
        ("https://127.0.0.1:8443/hook", "resolves to 127.0.0.1"),
        ("https://10.0.0.1/hook", "resolves to 10.0.0.1"),
        ("https://192.168.1.20/hook", "resolves to"),
        ("https://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254"),
        ("https://0.0.0.0/hook", "resolves to"),
        ("https://224.0.0.1/hook", "resolves to"),
        ("https://[::ffff:127.0.0.1]/hook", "resolves to"),
        ("https://[fe80::1]/hook", "resolves to"),
        ("https://user:pw@93.184.216.34/hook", "user name"),
        ("ftp://93.184.216.34/hook", "https://"),
        ("https:///nohost", "no host"),
    ],
)
def test_production_refuses_urls_that_are_not_public_https(
    alice: Person, url: str, says: str
) -> None:
    response = _create(alice, url=url, events=["*"])
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == "url"
    assert says in error["message"]


@PRODUCTION
def test_production_accepts_a_public_https_url(alice: Person) -> None:
    response = _create(alice, url="https://93.184.216.34/hook", events=["*"])
    assert response.status_code == 201, response.content
    # Changing the URL is checked the same way.
    changed = alice.client.post(
        f"/v1/webhooks/{response.json()['id']}", {"url": "https://localhost/x"}, format="json"
    )
    assert changed.status_code == 400
    assert changed.json()["error"]["param"] == "url"


def test_a_hostname_is_accepted_syntactically_without_a_lookup() -> None:
    assert url_parse("https://example.com/hooks", allow_private=False) == (
        "https",
        "example.com",
        443,
    )
    with pytest.raises(UrlRefused):
        url_parse("http://example.com/hooks", allow_private=False)


def test_each_delivery_checks_the_address_again(
    alice: Person, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    # Accepted while private URLs were allowed (or a name that resolved elsewhere then):
    # a delivery under production settings refuses it, and nothing reaches it.
    url = receiver.url.replace("http://127.0.0.1", "https://localhost")
    hook = _create(alice, url=url, events=["*"]).json()
    job_id = make_job(alice)
    with PRODUCTION, django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert receiver.received == []
    [log] = _deliveries(alice, hook["id"])
    assert log["outcome"] == "failed"
    assert log["status_code"] is None
    assert "resolves to" in log["error"]


# --- bad input, roles, tenancy --------------------------------------------------------------


def test_unknown_events_are_refused_listing_the_valid_ones(alice: Person) -> None:
    response = _create(alice, url="https://93.184.216.34/h", events=["job.done", "batch.failed"])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "events"
    assert "'job.done'" in error["message"]
    assert all(name in error["message"] for name in EVENT_TYPES)
    assert _create(alice, url="https://93.184.216.34/h", events=[]).status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"url": "https://93.184.216.34/" + "a" * 2048, "events": ["*"]},
        {"url": "https://93.184.216.34/h", "events": ["*"], "description": "d" * 501},
        {"url": "https://93.184.216.34/h", "events": ["*"] * 33},
        {"url": "https://93.184.216.34/h", "events": ["x" * 65]},
        {"url": "https://93.184.216.34/h", "events": "*"},
        {"url": "https://93.184.216.34/h", "events": ["*"], "secret": "whsec_mine"},
        {"events": ["*"]},
    ],
)
def test_bad_input_is_a_400(alice: Person, body: dict[str, Any]) -> None:
    response = _create(alice, **body)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_viewer_can_read_but_not_create_and_no_key_is_401(alice: Person) -> None:
    viewer = join(alice.organization, "vera@acme.test", "viewer")
    response = _create(viewer, url="https://93.184.216.34/h", events=["*"])
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"
    hook = _create(alice, url="https://93.184.216.34/h", events=["*"]).json()
    assert viewer.client.get(f"/v1/webhooks/{hook['id']}").status_code == 200
    assert viewer.client.post(f"/v1/webhooks/{hook['id']}/rotate_secret").status_code == 403
    assert client_with(None).get("/v1/webhooks").status_code == 401
    assert client_with(None).post("/v1/webhooks", {}, format="json").status_code == 401


def test_another_tenants_webhooks_are_404_and_their_events_stay_theirs(
    alice: Person,
    charlie: Person,
    receiver: Receiver,
    django_capture_on_commit_callbacks: Any,
) -> None:
    theirs = _create(charlie, url=receiver.url, events=["*"]).json()
    for method, path in [
        ("get", ""),
        ("post", ""),
        ("patch", ""),
        ("delete", ""),
        ("post", "/rotate_secret"),
        ("get", "/deliveries"),
    ]:
        response = getattr(alice.client, method)(
            f"/v1/webhooks/{theirs['id']}{path}", {"enabled": False}, format="json"
        )
        assert response.status_code == 404, (method, path)
    assert alice.client.get("/v1/webhooks").json()["data"] == []
    # Alice's job ending is not sent to Charlie's webhook.
    job_id = make_job(alice)
    with django_capture_on_commit_callbacks(execute=True):
        alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert receiver.received == []
    assert WebhookDelivery.objects.for_organization(charlie.organization).count() == 0
