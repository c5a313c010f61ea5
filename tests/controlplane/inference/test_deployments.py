"""Deployments: which models an organization can call, created by hand or when a job succeeds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.inference import deployments
from controlplane.inference.models import Deployment
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    purge_broker,
    register_tiny_llama,
    upload_file,
)
from tests.support.people import Person, client_with, join
from tests.support.registry import base_model, customer_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(alice: Person) -> str:
    """One of Alice's fine-tuned models (a LoRA on the test base), not deployed."""
    return customer_model(alice, suffix="support").pk


def deploy(person: Person, **body: Any) -> Any:
    return person.client.post("/v1/deployments", body, format="json")


def active(person: Person) -> list[Deployment]:
    return list(deployments.deployments_active(person.organization))


def test_a_customer_model_is_deployed_listed_changed_and_deleted(alice: Person, model: str) -> None:
    response = deploy(alice, model=model, type="dedicated", min_replicas=2, max_replicas=4)
    assert response.status_code == 200, response.content
    created = response.json()
    assert created["id"].startswith("dep_")
    assert created == {
        "id": created["id"],
        "object": "deployment",
        "model": model,
        "type": "dedicated",
        "min_replicas": 2,
        "max_replicas": 4,
        "status": "active",
        "created_at": created["created_at"],
    }
    assert isinstance(created["created_at"], int)

    listed = alice.client.get("/v1/deployments").json()
    assert listed["object"] == "list"
    assert [d["id"] for d in listed["data"]] == [created["id"]]
    assert alice.client.get(f"/v1/deployments/{created['id']}").json() == created

    patched = alice.client.patch(
        f"/v1/deployments/{created['id']}", {"min_replicas": 3}, format="json"
    )
    assert patched.status_code == 200, patched.content
    assert (patched.json()["min_replicas"], patched.json()["max_replicas"]) == (3, 4)

    deleted = alice.client.delete(f"/v1/deployments/{created['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created["id"], "object": "deployment", "deleted": True}
    assert alice.client.get(f"/v1/deployments/{created['id']}").status_code == 404
    assert alice.client.get("/v1/deployments").json()["data"] == []
    # The row stays (history, staff), marked deleted.
    row = Deployment.objects.for_organization(alice.organization).get(pk=created["id"])
    assert row.status == "deleted"
    assert row.deleted_at is not None
    assert row.created_by_id == alice.user.pk


def test_serverless_defaults_scale_to_zero_and_dedicated_defaults_to_one_replica(
    alice: Person, model: str
) -> None:
    serverless = deploy(alice, model=model, type="serverless").json()
    assert (serverless["min_replicas"], serverless["max_replicas"]) == (0, 1)
    base = base_model()
    dedicated = deploy(alice, model=base.pk, type="dedicated").json()
    assert (dedicated["type"], dedicated["min_replicas"], dedicated["max_replicas"]) == (
        "dedicated",
        1,
        1,
    )


def test_deployments_are_listed_newest_first_with_a_cursor(alice: Person) -> None:
    ids = []
    for i in range(3):
        model_id = customer_model(alice, suffix=f"m{i}").pk
        ids.append(deploy(alice, model=model_id, type="serverless").json()["id"])
        time.sleep(0.002)  # ids order by the millisecond they were made in
    first = alice.client.get("/v1/deployments?limit=2").json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    rest = alice.client.get(f"/v1/deployments?limit=2&after={first['last_id']}").json()
    assert [d["id"] for d in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False
    (only,) = alice.client.get(f"/v1/deployments?model={first['data'][0]['model']}").json()["data"]
    assert only["id"] == ids[2]


def test_a_second_active_deployment_of_a_model_is_409_naming_the_first(
    alice: Person, model: str
) -> None:
    first = deploy(alice, model=model, type="serverless").json()

    response = deploy(alice, model=model, type="dedicated")

    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "deployment_exists"
    assert first["id"] in error["message"]
    assert response["x-should-retry"] == "false"
    assert len(active(alice)) == 1
    # Once deleted, the model can be deployed again.
    alice.client.delete(f"/v1/deployments/{first['id']}")
    assert deploy(alice, model=model, type="dedicated").status_code == 200


def test_the_same_model_id_deploys_independently_in_each_organization(
    alice: Person, charlie: Person
) -> None:
    base = base_model()
    assert deploy(alice, model=base.pk, type="dedicated").status_code == 200
    assert deploy(charlie, model=base.pk, type="dedicated").status_code == 200


@pytest.mark.parametrize("model_id", ["ft:test-base:nope:x:ftjob-nope", "no-such-base", "a b"])
def test_an_unknown_model_is_404_model_not_found(alice: Person, model_id: str) -> None:
    base_model()
    response = deploy(alice, model=model_id, type="serverless")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert active(alice) == []


def test_a_foreign_customer_model_is_the_same_404(alice: Person, charlie: Person) -> None:
    foreign = customer_model(charlie, suffix="secret").pk
    response = deploy(alice, model=foreign, type="dedicated")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert active(alice) == []
    assert active(charlie) == []


def test_a_model_no_inference_task_can_serve_is_refused(alice: Person) -> None:
    odd = base_model("odd-base", tasks=["painting"])
    response = deploy(alice, model=odd.pk, type="serverless")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"type": "dedicated", "min_replicas": -1}, "min_replicas"),
        ({"type": "dedicated", "min_replicas": 9}, "min_replicas"),
        ({"type": "dedicated", "min_replicas": 0}, "min_replicas"),
        ({"type": "dedicated", "min_replicas": "many"}, "min_replicas"),
        ({"type": "dedicated", "min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"type": "dedicated", "max_replicas": 9}, "max_replicas"),
        ({"type": "serverless", "min_replicas": 1}, "min_replicas"),
        ({"type": "serverless", "max_replicas": 0}, "max_replicas"),
        ({"type": "hosted"}, "type"),
        ({}, "type"),
        ({"type": "serverless", "organization": "org_x"}, "organization"),
    ],
)
def test_bad_input_is_400_naming_the_field(
    alice: Person, model: str, body: dict[str, Any], param: str
) -> None:
    response = deploy(alice, model=model, **body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert active(alice) == []


def test_the_replica_cap_is_a_setting(alice: Person, model: str, settings: Any) -> None:
    settings.INFERENCE_MAX_REPLICAS = 2
    response = deploy(alice, model=model, type="dedicated", min_replicas=3)
    assert response.status_code == 400
    assert "between 1 and 2" in response.json()["error"]["message"]


def test_patch_validates_replicas_against_the_type(alice: Person, model: str) -> None:
    dep = deploy(alice, model=model, type="serverless").json()["id"]
    url = f"/v1/deployments/{dep}"
    for body, param in [
        ({"min_replicas": 1}, "min_replicas"),
        ({"max_replicas": 99}, "max_replicas"),
        ({"type": "dedicated"}, "type"),
    ]:
        response = alice.client.patch(url, body, format="json")
        assert response.status_code == 400, response.content
        assert response.json()["error"]["param"] == param
    assert alice.client.patch(url, {"max_replicas": 5}, format="json").json()["max_replicas"] == 5


def test_malformed_json_non_object_and_oversized_bodies_are_refused(
    alice: Person, model: str
) -> None:
    response = alice.client.post("/v1/deployments", b"{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert alice.client.post("/v1/deployments", [1, 2], format="json").status_code == 400
    response = deploy(alice, model=model, type="serverless", padding="x" * 2_000_000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert active(alice) == []


def test_unauthenticated_is_401_and_a_viewer_can_read_but_not_deploy(
    alice: Person, model: str
) -> None:
    dep = deploy(alice, model=model, type="serverless").json()["id"]
    assert client_with(None).get("/v1/deployments").status_code == 401
    assert client_with(None).post("/v1/deployments", {}, format="json").status_code == 401

    viewer = join(alice.organization, "vic@acme.test", "viewer")
    assert viewer.client.get("/v1/deployments").status_code == 200
    assert viewer.client.get(f"/v1/deployments/{dep}").status_code == 200
    for response in (
        viewer.client.post("/v1/deployments", {"model": model, "type": "dedicated"}, format="json"),
        viewer.client.patch(f"/v1/deployments/{dep}", {"max_replicas": 2}, format="json"),
        viewer.client.delete(f"/v1/deployments/{dep}"),
    ):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "missing_scope"
    assert len(active(alice)) == 1


def test_a_teammate_sees_and_manages_the_organizations_deployments(
    alice: Person, bob: Person, model: str
) -> None:
    dep = deploy(alice, model=model, type="serverless").json()["id"]
    assert [d["id"] for d in bob.client.get("/v1/deployments").json()["data"]] == [dep]
    assert bob.client.delete(f"/v1/deployments/{dep}").status_code == 200


def test_base_models_are_callable_without_a_deployment_customer_models_only_once_deployed(
    alice: Person, charlie: Person
) -> None:
    base = base_model()
    own = customer_model(alice, suffix="mine")
    org = alice.organization

    assert deployments.model_is_deployed(organization=org, model=base)
    assert deployments.deployment_for_model(organization=org, model_id=base.pk) is None
    assert not deployments.model_is_deployed(organization=org, model=own)

    dep = deploy(alice, model=own.pk, type="serverless").json()["id"]
    assert deployments.model_is_deployed(organization=org, model=own)
    found = deployments.deployment_for_model(organization=org, model_id=own.pk)
    assert found is not None
    assert found.pk == dep
    # Another organization's deployment of nothing of theirs changes nothing for them.
    assert (
        deployments.deployment_for_model(organization=charlie.organization, model_id=own.pk) is None
    )

    alice.client.delete(f"/v1/deployments/{dep}")
    assert not deployments.model_is_deployed(organization=org, model=own)
    assert deployments.model_is_deployed(organization=org, model=base)


def test_ensure_serverless_is_idempotent_and_keeps_an_existing_deployment(
    alice: Person, model: str
) -> None:
    org = alice.organization
    first = deployments.deployment_ensure_serverless(organization=org, model_id=model)
    again = deployments.deployment_ensure_serverless(organization=org.pk, model_id=model)
    assert first.pk == again.pk
    assert (first.type, first.min_replicas, first.max_replicas) == ("serverless", 0, 1)
    assert len(active(alice)) == 1

    deployments.deployment_delete(deployment=first)
    dedicated = deploy(alice, model=model, type="dedicated", min_replicas=2).json()["id"]
    kept = deployments.deployment_ensure_serverless(organization=org, model_id=model)
    assert kept.pk == dedicated
    assert kept.type == "dedicated"


def test_deleting_a_model_s_deployments_frees_it(alice: Person, model: str) -> None:
    deploy(alice, model=model, type="dedicated", min_replicas=2)
    org = alice.organization
    assert deployments.deployments_delete_for_model(organization=org, model_id=model) == 1
    assert active(alice) == []
    assert deployments.deployments_delete_for_model(organization=org, model_id=model) == 0


def test_deleting_a_customer_model_deletes_its_deployment(alice: Person, model: str) -> None:
    # The registry announces the deletion (it never imports inference); inference listens.
    deploy(alice, model=model, type="dedicated", min_replicas=2)
    assert len(active(alice)) == 1

    assert alice.client.delete(f"/v1/models/{model}").status_code == 200

    assert active(alice) == []


@pytest.mark.django_db(transaction=True)
def test_concurrent_deploys_of_one_model_leave_one_and_409_the_others(alice: Person) -> None:
    import threading

    from django.db import connection

    from controlplane.core.errors import Conflict

    model_id = customer_model(alice, suffix="race").pk
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            barrier.wait()
            deployments.deployment_create(
                organization=alice.organization,
                user_id=None,
                model_id=model_id,
                type="serverless",
            )
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert sorted(outcomes) == ["conflict"] * 3 + ["created"]
    assert len(active(alice)) == 1


# --- auto-deploy when a fine-tuning job succeeds ---------------------------------------------


@pytest.fixture
def _broker() -> Iterator[None]:
    purge_broker()
    yield
    purge_broker()


def run_to_success(job_id: str, steps: int = 2) -> None:
    worker = Worker(job_id, 1)
    worker.report(contract.STARTED, total_steps=steps, resumed_from_step=0, device="cpu")
    for step in range(1, steps + 1):
        worker.report(contract.PROGRESS, step=step, total_steps=steps, trained_tokens=step * 10)
    worker.report(contract.CHECKPOINT, step=1, uri=worker.uri("checkpoints", "step-1"), metrics={})
    report = worker.report(
        contract.SUCCEEDED,
        step=steps,
        trained_tokens=steps * 10,
        artifact_uri=worker.uri("final"),
        artifact_kind="lora",
    )
    assert report == "applied"


@pytest.mark.usefixtures("_broker")
def test_a_succeeded_job_s_model_is_deployed_serverless_at_once_and_its_checkpoints_are_not(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    register_tiny_llama()  # real: the job counts tokens with its tokenizer
    file_id = upload_file(alice, chat_rows(20), django_capture_on_commit_callbacks)
    response = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=file_id
    )
    assert response.status_code == 200, response.content
    job_id = response.json()["id"]
    assert alice.client.get("/v1/deployments").json()["data"] == []

    with django_capture_on_commit_callbacks(execute=True):
        run_to_success(job_id)
        # A late duplicate of the success report changes nothing.
        late = Worker(job_id, 1)
        late.seq = 100
        late.report(contract.SUCCEEDED, step=2, trained_tokens=20, artifact_uri=late.uri("final"))

    job = alice.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    (listed,) = alice.client.get("/v1/deployments").json()["data"]
    assert listed["model"] == job["fine_tuned_model"]
    assert (listed["type"], listed["min_replicas"], listed["max_replicas"]) == ("serverless", 0, 1)

    (checkpoint,) = alice.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    ckpt_model = checkpoint["fine_tuned_model_checkpoint"]
    from controlplane.modelregistry.selectors import model_for_organization

    ckpt = model_for_organization(organization=alice.organization, model_id=ckpt_model)
    assert not deployments.model_is_deployed(organization=alice.organization, model=ckpt)
    # …until deployed explicitly.
    assert deploy(alice, model=ckpt_model, type="serverless").status_code == 200
    assert deployments.model_is_deployed(organization=alice.organization, model=ckpt)


# --- staff ---------------------------------------------------------------------------------


def test_staff_find_deployments_and_delete_one_softly_with_an_audit_entry(
    alice: Person, model: str
) -> None:
    from django.test import Client
    from django.urls import reverse

    from controlplane.accounts.models import User
    from controlplane.audit.models import AuditLog

    dep = deploy(alice, model=model, type="dedicated", min_replicas=2).json()["id"]
    staff = Client()
    staff.force_login(User.objects.create_superuser(email="ops@atelier.test", password="x" * 12))

    listing = staff.get("/admin/inference/deployment/?q=support")
    detail = staff.get(reverse("admin:inference_deployment_change", args=[dep]))
    assert listing.status_code == detail.status_code == 200
    assert dep.encode() in listing.content
    assert staff.get("/admin/inference/deployment/add/").status_code == 403

    response = staff.post(
        "/admin/inference/deployment/",
        {"action": "delete_deployments", "_selected_action": [dep]},
    )
    assert response.status_code == 302
    assert active(alice) == []
    entry = AuditLog.objects.for_organization(alice.organization).get(
        action="admin.deployment.deleted"
    )
    assert (entry.target_id, entry.details) == (dep, {"model": model})
