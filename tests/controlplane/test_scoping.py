"""Organization-owned models cannot be queried without an organization."""

from __future__ import annotations

import pytest

from controlplane.accounts.models import APIKey
from controlplane.audit.models import AuditLog
from controlplane.batches.models import Batch
from controlplane.billing.models import (
    CreditGrant,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    PlanAssignment,
)
from controlplane.core.scoping import OrganizationOwned, UnscopedQueryError
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
from controlplane.engagements.models import Engagement, EngagementEvent, Milestone
from controlplane.inference.models import Deployment, UsageRecord
from controlplane.jobs.models import Job, JobCheckpoint, JobEvent
from controlplane.limits.models import Budget, BudgetAlert, KeyLimits
from controlplane.modelregistry.models import CustomerModel, FileEstimate
from controlplane.notifications.models import Webhook, WebhookDelivery, WebhookEvent
from controlplane.payments.models import Dunning, StripeCustomer, StripeInvoice, Subscription
from controlplane.tenancy.models import Invitation, Membership
from tests.support.people import Person

pytestmark = pytest.mark.django_db

OWNED = [
    APIKey,
    AuditLog,
    Invitation,
    Membership,
    File,
    Upload,
    UploadPart,
    Dataset,
    DatasetVersion,
    Listing,
    AccessGrant,
    PartnerUsage,
    CustomerModel,
    FileEstimate,
    Job,
    JobEvent,
    JobCheckpoint,
    Deployment,
    UsageRecord,
    LedgerEntry,
    PlanAssignment,
    CreditGrant,
    Invoice,
    InvoiceLine,
    KeyLimits,
    Budget,
    BudgetAlert,
    StripeCustomer,
    Subscription,
    Dunning,
    StripeInvoice,
    Engagement,
    Milestone,
    EngagementEvent,
    Batch,
    Webhook,
    WebhookEvent,
    WebhookDelivery,
]


@pytest.mark.parametrize("model", OWNED, ids=lambda m: m.__name__)
@pytest.mark.parametrize("query", ["all", "filter", "get", "count", "first"])
def test_query_without_an_organization_fails_loudly(model: type, query: str) -> None:
    with pytest.raises(UnscopedQueryError, match="for_organization"):
        getattr(model.objects, query)()


@pytest.mark.parametrize("model", OWNED, ids=lambda m: m.__name__)
def test_creating_without_an_organization_fails_loudly(model: type) -> None:
    with pytest.raises(UnscopedQueryError):
        model.objects.create()


def test_every_organization_owned_model_is_in_this_test() -> None:
    from django.apps import apps

    owned = {m for m in apps.get_models() if issubclass(m, OrganizationOwned)}
    assert owned == set(OWNED)


def test_for_organization_sees_only_that_organization(alice: Person, charlie: Person) -> None:
    alices = APIKey.objects.for_organization(alice.organization)
    assert alices.count() == 1
    assert {k.organization_id for k in alices} == {alice.organization.pk}


def test_an_empty_organization_is_refused() -> None:
    with pytest.raises(UnscopedQueryError):
        Membership.objects.for_organization("")
