"""Staff manage base models' prices and availability, and see and delete customer models."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from controlplane.accounts.models import User
from controlplane.audit.models import AuditLog
from controlplane.modelregistry.models import BaseModel, CustomerModel
from tests.support.people import Person
from tests.support.registry import base_model, customer_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> Client:
    user = User.objects.create_superuser(email="ops@atelier.test", password="staff pass 12345")
    client = Client()
    client.force_login(user)
    return client


def test_staff_see_base_and_customer_models(staff: Client, alice: Person) -> None:
    base = base_model("atelier-tiny-llama")
    model = customer_model(alice, base=base, suffix="bot")

    listing = staff.get("/admin/modelregistry/customermodel/?q=bot")
    detail = staff.get(reverse("admin:modelregistry_customermodel_change", args=[model.pk]))

    assert listing.status_code == detail.status_code == 200
    assert model.pk.encode() in listing.content
    assert model.pk.encode() in detail.content
    assert staff.get("/admin/modelregistry/basemodel/?q=llama").status_code == 200
    assert staff.get("/admin/modelregistry/basemodel/add/").status_code == 403


def test_staff_change_a_base_models_price_and_availability(staff: Client) -> None:
    base_model("atelier-tiny-llama")
    url = reverse("admin:modelregistry_basemodel_change", args=["atelier-tiny-llama"])

    response = staff.post(
        url,
        {
            "tasks": '["causal_lm"]',
            "methods": '["supervised"]',
            "adapters": '["lora"]',
            "price_per_1k_training_tokens": "0.002",
            "description": "cheaper soon",
            # is_active left out: unchecked
        },
    )

    assert response.status_code == 302, response.content[:2000]
    model = BaseModel.objects.get()
    assert (str(model.price_per_1k_training_tokens), model.is_active) == ("0.002000", False)
    assert model.uri == "file:///nonexistent/atelier-tiny-llama"  # read-only


def test_staff_delete_a_customer_model_softly_and_it_is_audited(
    staff: Client, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    model = customer_model(alice)

    with django_capture_on_commit_callbacks(execute=True):
        response = staff.post(
            "/admin/modelregistry/customermodel/",
            {"action": "soft_delete", "_selected_action": [model.pk]},
        )

    assert response.status_code == 302
    assert CustomerModel.objects.for_organization(alice.organization).get().deleted_at is not None
    entry = AuditLog.objects.for_organization(alice.organization).get(action="admin.model.deleted")
    assert entry.details == {"model_id": model.pk}
    assert entry.actor_email == "ops@atelier.test"
