"""An `/v1/embeddings` batch end to end, through the official `openai` SDK, on real
processes (`atelier web`, the control and inference workers): each line's vector is the
one the live endpoint answers for the same input."""

from __future__ import annotations

import io
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import redis

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.modelregistry.models import BaseModel
from jobcontracts import queues
from jobcontracts.inference import batch_queue
from tests.controlplane.batches.test_batch_reaper import ENV, control_worker
from tests.support.jobs import purge_broker
from tests.support.models import minilm_dir
from tests.support.people import Person
from tests.support.processes import asgi_server, worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MINILM = "all-MiniLM-L6-v2"
EMBEDDINGS = "/v1/embeddings"
TEXTS = [
    "Where is my order? It was supposed to arrive on Monday.",
    "The invoice for last month is attached to this email.",
    "Reset the password from the account settings page.",
    "The cat sat on the mat and looked out of the window.",
    "A refund takes five to seven business days.",
    "embeddings",
]


def test_an_embeddings_batch_answers_what_the_live_endpoint_does(
    alice: Person, tmp_path: Path, settings: Any
) -> None:
    purge_broker()
    redis.Redis.from_url(settings.REDIS_URL).delete(batch_queue(queues.GPU_INFERENCE))
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
    lines = [
        {
            "custom_id": f"emb-{i}",
            "method": "POST",
            "url": EMBEDDINGS,
            "body": {"model": MINILM, "input": text},
        }
        for i, text in enumerate(TEXTS)
    ]
    # One line with a list of inputs: one vector each, in order.
    lines.append(
        {
            "custom_id": "emb-pair",
            "method": "POST",
            "url": EMBEDDINGS,
            "body": {"model": MINILM, "input": TEXTS[:2]},
        }
    )
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    with (
        worker("inference", tmp_path / "inference", **ENV),
        control_worker(tmp_path / "control"),
        asgi_server(tmp_path / "web", **ENV) as web,
    ):
        client = openai.OpenAI(api_key=alice.key, base_url=web.url + "/v1", max_retries=0)
        file = client.files.create(file=("embed.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=file.id, endpoint=EMBEDDINGS, completion_window="24h"
        )
        assert batch.endpoint == EMBEDDINGS
        deadline = time.monotonic() + 240
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, "the batch did not end"
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.total, batch.request_counts.completed) == (len(lines),) * 2
        assert batch.request_counts.failed == 0
        assert batch.output_file_id
        assert batch.error_file_id is None
        output_file = client.files.retrieve(batch.output_file_id)
        assert output_file.purpose == "batch_output"
        listed = client.files.list(purpose="batch_output").data
        assert [f.id for f in listed] == [batch.output_file_id]
        output = [
            json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()
        ]
        live = client.embeddings.create(model=MINILM, input=TEXTS)

    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]
    expected = np.array([d.embedding for d in live.data])
    assert expected.shape == (len(TEXTS), 384)
    got = []
    for o in output[: len(TEXTS)]:
        assert o["error"] is None
        assert o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "list"
        assert body["model"] == MINILM
        assert [d["index"] for d in body["data"]] == [0]
        assert body["usage"]["prompt_tokens"] > 0
        got.append(body["data"][0]["embedding"])
    vectors = np.array(got)
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    cosines = (vectors * expected).sum(1) / np.linalg.norm(vectors, axis=1)
    cosines /= np.linalg.norm(expected, axis=1)
    assert cosines.min() > 0.9999, cosines
    pair = output[-1]["response"]["body"]["data"]
    assert [d["index"] for d in pair] == [0, 1]
    np.testing.assert_allclose(np.array([d["embedding"] for d in pair]), expected[:2], atol=1e-4)

    # Billed once per line, at the batch price, by the batch.
    batch_entries = LedgerEntry.objects.for_organization(alice.organization).filter(
        source="batches", meter=Meter.PROMPT_TOKENS
    )
    assert batch_entries.count() == len(lines)
    assert sum(e.quantity for e in batch_entries) == sum(
        o["response"]["body"]["usage"]["prompt_tokens"] for o in output
    )
