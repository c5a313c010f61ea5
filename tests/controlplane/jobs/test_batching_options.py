"""How a fine-tune batches its rows, from the API to the worker's spec: length-grouped
batches by default (`hyperparameters.group_by_length`), packing on request
(`hyperparameters.packing`, supervised causal LMs only)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.jobs import (
    TINY_LLAMA,
    chat_rows,
    create_job,
    register_tiny_llama,
    sent_specs,
    upload_file,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db

PREFERENCE = b"".join(
    json.dumps({"prompt": f"q {i}", "chosen": " yes", "rejected": " no"}).encode() + b"\n"
    for i in range(10)
)


@pytest.fixture
def chat_file(alice: Person, django_capture_on_commit_callbacks: Any) -> str:
    register_tiny_llama()
    return upload_file(alice, chat_rows(20), django_capture_on_commit_callbacks)


def supervised(**hyperparameters: Any) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def test_defaults_group_by_length_and_do_not_pack(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    created = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    )
    assert created.status_code == 200, created.content
    hp = created.json()["hyperparameters"]
    assert (hp["group_by_length"], hp["packing"]) == (True, False)
    spec = next(s for s in sent_specs() if s.job_id == created.json()["id"])
    assert (spec.hyperparameters.group_by_length, spec.hyperparameters.packing) == (True, False)


def test_the_choices_reach_the_worker(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    created = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=chat_file,
        method=supervised(group_by_length=False, packing=True),
    )
    assert created.status_code == 200, created.content
    job = alice.client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}").json()
    assert (job["hyperparameters"]["group_by_length"], job["hyperparameters"]["packing"]) == (
        False,
        True,
    )
    spec = next(s for s in sent_specs() if s.job_id == job["id"])
    assert (spec.hyperparameters.group_by_length, spec.hyperparameters.packing) == (False, True)


def test_packing_a_dpo_job_is_refused_naming_it(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    register_tiny_llama()
    preference = upload_file(alice, PREFERENCE, django_capture_on_commit_callbacks)
    refused = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=preference,
        method={"type": "dpo", "dpo": {"hyperparameters": {"packing": True}}},
    )
    assert refused.status_code == 400, refused.content
    assert refused.json()["error"]["param"] == "hyperparameters.packing"


@pytest.mark.parametrize("value", ["yes please", 3, None, [True]])
def test_a_packing_that_is_no_boolean_is_refused(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, value: Any
) -> None:
    refused = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=chat_file,
        method=supervised(packing=value),
    )
    assert refused.status_code == 400, refused.content
    assert "packing" in refused.json()["error"]["param"]
