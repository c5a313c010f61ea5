"""Every admin list page costs the same number of queries for 2 rows as for 6 (no N+1).

Runs over every model registered in `django.contrib.admin.site`, so an admin added later
is checked too: each needs a factory in FACTORIES (one call adds one row of the model,
with its foreign keys set as in real data), or this test fails naming it.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Any

import pytest
from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Group
from django.db import connection, models
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from controlplane.accounts.models import APIKey, User
from controlplane.audit.services import audit_record
from controlplane.billing.credits import credit_grant
from controlplane.billing.models import (
    Invoice,
    InvoiceLine,
    LedgerEntry,
    Plan,
    PlanAssignment,
    PriceBookEntry,
)
from controlplane.billing.plans import plans_ensure_defaults
from controlplane.datasets.models import (
    AccessGrant,
    Dataset,
    DatasetVersion,
    File,
    Listing,
    PartnerUsage,
    Upload,
    UploadPart,
)
from controlplane.inference.models import Deployment, UsageRecord
from controlplane.limits.models import BudgetAlert, KeyLimits
from controlplane.modelregistry.models import BaseModel
from controlplane.payments.models import (
    Dunning,
    StripeCustomer,
    StripeEvent,
    StripeInvoice,
    Subscription,
)
from controlplane.tenancy import services as tenancy_services
from controlplane.tenancy.models import Organization
from tests.support.budgets import monthly_budget
from tests.support.people import SYSTEM, Person, join, sign_up
from tests.support.registry import base_model, customer_model

pytestmark = pytest.mark.django_db

_serial = itertools.count(1000)


@dataclass
class World:
    """What the factories hang rows on: Acme (alice, a customer), a data partner, staff."""

    staff: User
    seen: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def alice(self) -> Person:
        return sign_up("alice@acme.test", "Acme")

    @property
    def org(self) -> Organization:
        return self.alice.organization

    @cached_property
    def partner(self) -> Person:
        return sign_up("dana@data.test", "Data Co", kinds=["customer", "data_partner"])

    @cached_property
    def base(self) -> BaseModel:
        return base_model("test-base")

    @cached_property
    def partner_version(self) -> DatasetVersion:
        dataset = Dataset._plain.create(organization=self.partner.organization, name="corpus")
        return _version(dataset, 1)

    def new_org(self, i: int) -> Organization:
        return Organization.objects.create(name=f"Org {i}")

    def new_member(self, i: int) -> Person:
        return join(self.org, f"dev{i}@acme.test", "developer")


def _version(dataset: Dataset, number: int) -> DatasetVersion:
    return DatasetVersion._plain.create(
        organization_id=dataset.organization_id,
        dataset=dataset,
        number=number,
        source_files=["file-a", "file-b"],
        recipe={"dedupe": "exact", "max_tokens": 512},
        format="chat",
        status="ready",
        rows=10,
        bytes=1000,
        sha256="0" * 64,
        report={"rows_in": 12, "rows_out": 10, "removed": {"exact_duplicate": 2}},
    )


def _auto(model: type[models.Model], w: World, **given: Any) -> models.Model:
    """A row of `model` with every required field filled: for models other helpers are
    changing (jobs, engagements), so a new required field does not break this test."""
    values: dict[str, Any] = dict(given)
    n = next(_serial)
    for f in model._meta.concrete_fields:
        if (
            f.name in values
            or f.attname in values
            or f.has_default()
            or f.null
            or (f.blank and f.empty_strings_allowed)
            or getattr(f, "auto_now", False)
            or getattr(f, "auto_now_add", False)
            or f.db_default is not models.NOT_PROVIDED
            or isinstance(f, models.AutoField)
        ):
            continue
        if f.is_relation:
            related = f.related_model
            if related is Organization:
                values[f.name] = w.org
            elif related is User:
                values[f.name] = w.staff
            elif related is BaseModel:
                values[f.name] = w.base
            else:
                values[f.name] = _auto(related, w)  # type: ignore[arg-type]
        elif f.choices:
            values[f.name] = f.choices[0][0]
        elif isinstance(f, models.EmailField):
            values[f.name] = f"x{n}@example.test"
        elif isinstance(f, models.CharField | models.TextField):
            values[f.name] = f"x{n}"[: getattr(f, "max_length", None) or 40]
        elif isinstance(f, models.BooleanField):
            values[f.name] = False
        elif isinstance(f, models.DecimalField):
            values[f.name] = Decimal("1")
        elif isinstance(f, models.IntegerField | models.FloatField):
            values[f.name] = n
        elif isinstance(f, models.DateTimeField):
            values[f.name] = timezone.now()
        elif isinstance(f, models.DateField):
            values[f.name] = date.today()
        elif isinstance(f, models.JSONField):
            values[f.name] = {}
        else:
            raise AssertionError(f"_auto cannot fill {model.__name__}.{f.name} ({type(f)})")
    return model._default_manager.create(**values)


def _get_model(label: str) -> type[models.Model]:
    return apps.get_model(label)


# --- one call, one row -------------------------------------------------------------------


def _user(w: World, i: int) -> None:
    w.new_member(i)  # a user in an organization (the organizations column counts them)


def _api_key(w: World, i: int) -> None:
    w.new_member(i)  # with its first key, bound to the member


def _organization(w: World, i: int) -> None:
    org = w.new_org(i)
    join(org, f"owner{i}@org{i}.test", "owner")
    credit_grant(organization=org, amount=Decimal("5"), source="staff", idempotency_key=f"c{i}")
    Subscription._plain.create(organization=org, plan="pro", status="active")
    now = timezone.now()
    Dunning._plain.create(
        organization=org, stripe_invoice_id=f"in_{i}", started_at=now, grace_ends_at=now
    )


def _membership(w: World, i: int) -> None:
    w.new_member(i)


def _invitation(w: World, i: int) -> None:
    tenancy_services.invitation_create(
        organization=w.org,
        email=f"new{i}@acme.test",
        role="developer",
        actor_role="owner",
        invited_by_id=w.alice.user.pk,
        actor=SYSTEM,
    )


def _audit_log(w: World, i: int) -> None:
    audit_record(organization=w.org, actor=SYSTEM, action=f"test.{i}", target=w.org)


def _file(w: World, i: int) -> None:
    File._plain.create(
        organization=w.org,
        filename=f"train{i}.jsonl",
        purpose="fine-tune",
        bytes=1234,
        sha256="0" * 64,
        storage_name=f"files/{w.org.pk}/f{i}",
        status="processed",
        validation={"format": "chat", "rows": 10, "error_count": 1, "errors": [{"line": 3}]},
        created_by=w.alice.user,
    )


def _upload(w: World, i: int) -> None:
    upload = Upload._plain.create(
        organization=w.org,
        filename=f"big{i}.jsonl",
        purpose="fine-tune",
        bytes=10,
        expires_at=timezone.now() + timedelta(hours=1),
        created_by=w.alice.user,
    )
    UploadPart._plain.create(
        organization=w.org, upload=upload, bytes=10, sha256="0" * 64, storage_name="p"
    )


def _dataset(w: World, i: int) -> None:
    dataset = Dataset._plain.create(organization=w.org, name=f"set {i}")
    _version(dataset, 1)


def _dataset_version(w: World, i: int) -> None:
    dataset = w.seen.get("dataset") or Dataset._plain.create(organization=w.org, name="set")
    w.seen["dataset"] = dataset
    _version(dataset, i + 1)


def _listing(w: World, i: int) -> Listing:
    listing = Listing._plain.create(
        organization=w.partner.organization,
        version=w.partner_version,
        title=f"Corpus {i}",
        license_terms="research only",
        price_per_1k_tokens=Decimal("0.01"),
    )
    AccessGrant._plain.create(organization=w.new_org(i), listing=listing)
    return listing


def _access_grant(w: World, i: int) -> None:
    listing = Listing._plain.create(
        organization=w.partner.organization,
        version=w.partner_version,
        title=f"Corpus {i}",
        license_terms="research only",
        price_per_1k_tokens=Decimal("0.01"),
    )
    AccessGrant._plain.create(organization=w.org, listing=listing, note="for support bot")


def _partner_usage(w: World, i: int) -> None:
    listing = w.seen.get("listing") or _listing(w, 0)
    w.seen["listing"] = listing
    PartnerUsage._plain.create(
        organization=w.partner.organization,
        listing=listing,
        customer=w.org,
        job_id=f"ftjob-{i}",
        trained_tokens=1000,
        price_per_1k_tokens=Decimal("0.01"),
    )


def _base_model(w: World, i: int) -> None:
    customer_model(w.alice, base=base_model(f"base-{i}"))


def _customer_model(w: World, i: int) -> None:
    customer_model(w.alice, base=w.base, suffix=f"s{i}")


def _deployment(w: World, i: int) -> None:
    Deployment._plain.create(
        organization=w.org, model_id=f"ft:m{i}", type="serverless", created_by=w.alice.user
    )


def _usage_record(w: World, i: int) -> None:
    UsageRecord._plain.create(
        organization=w.org,
        request_id=f"chatcmpl-{i}",
        api_key_id="key-1",
        model="test-base",
        kind="chat",
        prompt_tokens=10,
        completion_tokens=20,
        status="completed",
        latency_ms=3.0,
        created_at=timezone.now(),
    )


def _plan(w: World, i: int) -> None:
    Plan.objects.create(
        code=f"plan{i}",
        name=f"Plan {i}",
        requests_per_minute=10,
        tokens_per_minute=1000,
        concurrent_fine_tuning_jobs=1,
    )
    Organization.objects.create(name=f"On plan {i}", plan=f"plan{i}")


def _plan_assignment(w: World, i: int) -> None:
    plans_ensure_defaults()
    PlanAssignment._plain.create(
        organization=w.new_org(i), plan_id="pro", effective_from=timezone.now()
    )


def _price(w: World, i: int) -> None:
    PriceBookEntry.objects.create(
        meter="inference.prompt_tokens",
        model=f"model-{i}",
        unit="1M tokens",
        per_units=1_000_000,
        unit_price=Decimal("0.5"),
        effective_from=timezone.now(),
    )


def _ledger_entry(w: World, i: int) -> None:
    LedgerEntry._plain.create(
        organization=w.org,
        idempotency_key=f"test:{i}",
        meter="inference.prompt_tokens",
        model="test-base",
        quantity=100,
        occurred_at=timezone.now(),
        source="inference",
        reference=f"chatcmpl-{i}",
    )


def _credit_grant(w: World, i: int) -> None:
    credit_grant(
        organization=w.org,
        amount=Decimal("10"),
        source="staff",
        idempotency_key=f"grant:{i}",
        granted_by_id=w.staff.pk,
    )


def _invoice(w: World, i: int) -> None:
    start = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=31 * i)
    invoice = Invoice._plain.create(
        organization=w.org,
        period_start=start,
        period_end=start + timedelta(days=30),
        subtotal=Decimal("3"),
        total=Decimal("3"),
    )
    InvoiceLine._plain.create(
        organization=w.org, invoice=invoice, kind="usage", description="tokens", amount=3
    )


def _stripe_customer(w: World, i: int) -> None:
    StripeCustomer._plain.create(organization=w.new_org(i), stripe_id=f"cus_{i}")


def _subscription(w: World, i: int) -> None:
    Subscription._plain.create(organization=w.new_org(i), plan="pro", status="active")


def _dunning(w: World, i: int) -> None:
    now = timezone.now()
    Dunning._plain.create(
        organization=w.org,
        stripe_invoice_id=f"in_{i}",
        amount_due=2900,
        currency="usd",
        started_at=now,
        grace_ends_at=now + timedelta(days=7),
    )


def _stripe_invoice(w: World, i: int) -> None:
    StripeInvoice._plain.create(organization=w.org, invoice_id=f"in-{i}", stripe_invoice_id="x")


def _stripe_event(w: World, i: int) -> None:
    StripeEvent.objects.create(
        id=f"evt_{i}", type="invoice.paid", created=0, organization=w.org, outcome="ok", payload={}
    )


def _key_limits(w: World, i: int) -> None:
    key = APIKey._plain.get(member=w.new_member(i).membership)
    KeyLimits._plain.create(organization=w.org, api_key=key, requests_per_minute=5)


def _budget(w: World, i: int) -> None:
    person = w.new_member(i)
    key = APIKey._plain.get(member=person.membership)
    monthly_budget(person, "10", name=f"budget {i}", key=key.pk)


def _budget_alert(w: World, i: int) -> None:
    budget = w.seen.get("budget") or monthly_budget(w.alice, "10")
    w.seen["budget"] = budget
    BudgetAlert._plain.create(
        organization=w.org,
        budget=budget,
        period_start=timezone.now(),
        threshold=i + 1,
        spent=Decimal("1"),
    )


def _group(w: World, i: int) -> None:
    Group.objects.create(name=f"group {i}")


# Models other helpers own (jobs, engagements) are built field by field (_auto): a field
# they add does not break the factory.


def _job(w: World, i: int) -> None:
    _auto(_get_model("jobs.Job"), w, organization=w.org, base_model=w.base, seed=i)


def _batch(w: World, i: int) -> None:
    _auto(_get_model("batches.Batch"), w, organization=w.org, total=i, completed=i)


def _webhook_delivery(w: World, i: int) -> None:
    # Each row with its own webhook and event: the list shows both.
    _auto(_get_model("notifications.WebhookDelivery"), w, organization=w.org, attempt=1)


def _engagement(w: World, i: int) -> None:
    _auto(_get_model("engagements.Engagement"), w, organization=w.org, owner=w.staff)


def _engagement_child(label: str) -> Callable[[World, int], None]:
    def make(w: World, i: int) -> None:
        engagement = w.seen.get("engagement") or _auto(
            _get_model("engagements.Engagement"), w, organization=w.org, owner=w.staff
        )
        w.seen["engagement"] = engagement
        _auto(_get_model(label), w, organization=w.org, engagement=engagement)

    return make


FACTORIES: dict[str, Callable[[World, int], Any]] = {
    "auth.Group": _group,
    "accounts.User": _user,
    "accounts.APIKey": _api_key,
    "tenancy.Organization": _organization,
    "tenancy.Membership": _membership,
    "tenancy.Invitation": _invitation,
    "audit.AuditLog": _audit_log,
    "datasets.File": _file,
    "datasets.Upload": _upload,
    "datasets.Dataset": _dataset,
    "datasets.DatasetVersion": _dataset_version,
    "datasets.Listing": _listing,
    "datasets.AccessGrant": _access_grant,
    "datasets.PartnerUsage": _partner_usage,
    "modelregistry.BaseModel": _base_model,
    "modelregistry.CustomerModel": _customer_model,
    "inference.Deployment": _deployment,
    "inference.UsageRecord": _usage_record,
    "billing.Plan": _plan,
    "billing.PlanAssignment": _plan_assignment,
    "billing.PriceBookEntry": _price,
    "billing.LedgerEntry": _ledger_entry,
    "billing.CreditGrant": _credit_grant,
    "billing.Invoice": _invoice,
    "payments.StripeCustomer": _stripe_customer,
    "payments.Subscription": _subscription,
    "payments.Dunning": _dunning,
    "payments.StripeInvoice": _stripe_invoice,
    "payments.StripeEvent": _stripe_event,
    "limits.KeyLimits": _key_limits,
    "limits.Budget": _budget,
    "limits.BudgetAlert": _budget_alert,
    "jobs.Job": _job,
    "batches.Batch": _batch,
    "notifications.Webhook": lambda w, i: _auto(
        _get_model("notifications.Webhook"), w, organization=w.org
    ),
    "notifications.WebhookEvent": lambda w, i: _auto(
        _get_model("notifications.WebhookEvent"), w, organization=w.org
    ),
    "notifications.WebhookDelivery": _webhook_delivery,
    "engagements.Engagement": _engagement,
    "engagements.Milestone": _engagement_child("engagements.Milestone"),
    "engagements.EngagementEvent": _engagement_child("engagements.EngagementEvent"),
}


REGISTERED = sorted(admin.site._registry, key=lambda m: m._meta.label)


@pytest.fixture
def staff() -> tuple[User, Client]:
    user = User.objects.create_superuser(email="ops@atelier.test", password="staff pass 12345")
    client = Client()
    client.force_login(user)
    return user, client


def _shape(sql: str) -> str:
    """A query without its literals: the same query for another row has the same shape."""
    return re.sub(r"'[^']*'|\b\d+\b", "?", sql)


def _changelist(client: Client, url: str) -> tuple[Any, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200, response.content[:2000]
    return response, [q["sql"] for q in queries.captured_queries]


def test_every_registered_model_has_a_factory() -> None:
    missing = [m._meta.label for m in REGISTERED if m._meta.label not in FACTORIES]
    assert not missing, (
        f"Registered in the admin without a factory in {__name__}.FACTORIES: {missing}. "
        "Add one, so the list page is checked for N+1 queries."
    )


@pytest.mark.parametrize("model", REGISTERED, ids=lambda m: m._meta.label)
def test_the_list_page_costs_the_same_queries_for_2_rows_as_for_6(
    model: type[models.Model], staff: tuple[User, Client]
) -> None:
    label = model._meta.label
    factory = FACTORIES.get(label)
    if factory is None:
        pytest.fail(f"{label} is registered in the admin but has no factory in FACTORIES")
    user, client = staff
    w = World(staff=user)
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    for i in range(2):
        factory(w, i)
    client.get(url)  # warm the process caches (content types, plans) out of the count

    small, small_sql = _changelist(client, url)
    for i in range(2, 6):
        factory(w, i)
    large, large_sql = _changelist(client, url)

    before = small.context_data["cl"].result_count
    after = large.context_data["cl"].result_count
    assert after == before + 4, f"each factory call adds one {label}: {before} -> {after}"
    extra = Counter(map(_shape, large_sql)) - Counter(map(_shape, small_sql))
    assert len(large_sql) == len(small_sql), (
        f"{label}: {len(small_sql)} queries for {before} rows, {len(large_sql)} for {after}; "
        "the larger page ran these more often:\n"
        + "\n".join(f"{n}x {sql}" for sql, n in extra.most_common(5))
    )
    # And a row's own page opens (read-only pages included).
    obj = large.context_data["cl"].result_list[0]
    change = reverse(
        f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[obj.pk]
    )
    assert client.get(change).status_code == 200
