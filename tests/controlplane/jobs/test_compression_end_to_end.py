"""A compressed model from the API to an answer, on real processes.

`POST /v1/compression/jobs` → the control plane → Redis → `atelier worker gpu`
(the real int8 quantization of the real MiniLM and of the tiny Llama) → the report
→ the compressed model, listed and deployed → the official `openai` SDK calls
`/v1/embeddings` and `/v1/chat/completions` on it through `atelier web` and
`atelier worker inference`, which loads the quantized artifact as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from controlplane.inference.models import UsageRecord
from controlplane.jobs.models import Job, JobStatus
from controlplane.modelregistry.models import BaseModel
from tests.support.jobs import purge_broker
from tests.support.models import minilm_dir, tiny_model_dir
from tests.support.people import Person
from tests.support.processes import Server, asgi_server, worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ENV = {
    "INFERENCE_SILENCE_SECONDS": "3",
    "INFERENCE_HEARTBEAT_SECONDS": "1",
    "JOBS_HEARTBEAT_SECONDS": "1",
    "TORCH_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
LLAMA = "atelier-tiny-llama"
MINILM = "all-MiniLM-L6-v2"
SENTENCES = [
    "Where is my order? It was supposed to arrive on Monday.",
    "The invoice for last month is attached to this email.",
    "Reset the password from the account settings page.",
    "The cat sat on the mat and looked out of the window.",
]


@pytest.fixture
def stack(alice: Person, tmp_path: Path) -> Iterator[Server]:
    purge_broker()
    BaseModel.objects.create(
        id=LLAMA,
        family="llama",
        tasks=["causal_lm"],
        methods=["supervised"],
        adapters=["lora", "full"],
        context_length=256,
        uri=tiny_model_dir("llama").as_uri(),
        price_per_1k_training_tokens=Decimal("0.0008"),
    )
    BaseModel.objects.create(
        id=MINILM,
        family="bert",
        tasks=["embeddings"],
        methods=[],
        adapters=[],
        context_length=256,
        uri=minilm_dir().as_uri(),
        price_per_1k_training_tokens=Decimal("0.0001"),
    )
    with (
        worker("control", tmp_path / "control", **ENV),
        worker("gpu", tmp_path / "gpu", **ENV),
        worker("inference", tmp_path / "inference", **ENV),
        asgi_server(tmp_path / "web", **ENV) as server,
    ):
        yield server


def compressed(person: Person, model: str) -> tuple[str, dict[str, Any]]:
    """Quantize `model` through the API and wait for the job; (model id, report)."""
    response = person.client.post(
        "/v1/compression/jobs", {"model": model, "method": "quantize"}, format="json"
    )
    assert response.status_code == 200, response.content
    job_id = response.json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = Job.objects.dangerously_unscoped().get(pk=job_id)
        if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
            break
        time.sleep(0.5)
    assert job.status == JobStatus.SUCCEEDED, (job.status, job.error)
    report = person.client.get(f"/v1/compression/jobs/{job_id}/report").json()
    return job.fine_tuned_model, report


def test_a_quantized_model_answers_as_its_source_did(stack: Server, alice: Person) -> None:
    client = openai.OpenAI(
        api_key=alice.key, base_url=stack.url + "/v1", max_retries=0, timeout=120
    )
    embedder, report = compressed(alice, MINILM)
    assert report["result"]["file_bytes"] * 2 <= report["source"]["file_bytes"]
    assert report["result"]["quality"] >= 0.98  # cosine to the source's embeddings
    assert embedder in {m.id for m in client.models.list().data}

    source = client.embeddings.create(model=MINILM, input=SENTENCES)
    small = client.embeddings.create(model=embedder, input=SENTENCES)
    assert small.model == embedder
    a = np.array([d.embedding for d in source.data])
    b = np.array([d.embedding for d in small.data])
    assert a.shape == b.shape == (len(SENTENCES), 384)
    cosines = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosines.min() >= 0.97, cosines

    generator, _ = compressed(alice, LLAMA)
    reply = client.chat.completions.create(
        model=generator,
        messages=[{"role": "user", "content": "where is my order"}],
        max_tokens=6,
        temperature=0,
    )
    assert reply.model == generator
    assert reply.usage is not None
    assert 1 <= reply.usage.completion_tokens <= 6
    wrong = pytest.raises(openai.BadRequestError)
    with wrong:
        client.embeddings.create(model=generator, input="an LM does not embed here")

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        billed = set(
            UsageRecord.objects.for_organization(alice.organization).values_list("model", flat=True)
        )
        if {embedder, generator} <= billed:
            break
        time.sleep(0.2)
    assert {embedder, generator} <= billed
