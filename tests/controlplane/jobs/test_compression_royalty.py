"""A compression job that recovers (prune) or distills on a data partner's licensed
version credits the partner for the tokens it really trained on, once: the real GPU
worker code runs the attempt in process on the spec the control plane sent, and its
reports are applied as the control queue applies them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from transformers import AutoTokenizer

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.datasets.models import PartnerUsage
from controlplane.jobs.models import Job
from controlplane.jobs.reports import report_apply
from gpuworkers.compression import measure, runner
from tests.controlplane.datasets.test_catalog import ROWS, publish, ready_version
from tests.gpuworkers.helpers import Reports
from tests.support.jobs import TINY_LLAMA, register_tiny_llama, sent_compression_specs
from tests.support.models import tiny_model_dir
from tests.support.people import Person, sign_up

pytestmark = pytest.mark.django_db


@pytest.fixture
def partner(db: None) -> Person:
    return sign_up("dana@mathdata.test", "MathData", kinds=["data_partner"])


@pytest.fixture(autouse=True)
def quick_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    # The report's latencies are not what this is about: one warm-up, one timed forward.
    monkeypatch.setattr(measure, "WARMUP", 1)
    monkeypatch.setattr(measure, "REPS_BATCH1", 1)
    monkeypatch.setattr(measure, "REPS_BATCH16", 1)


def row_tokens() -> int:
    """The partner's rows as the worker reads them (prompt + completion), in tokens."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    rows = [json.loads(line) for line in ROWS.splitlines()]
    texts = [row["prompt"] + row["completion"] for row in rows]
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"])


def test_a_pruned_model_recovered_on_partner_rows_credits_the_tokens_once(
    alice: Person, partner: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama()
    listing = publish(partner, ready_version(partner, captured), auto_approve=True)
    alice.client.post(f"/v1/catalog/{listing['id']}/access_requests")
    with captured(execute=True):
        response = alice.client.post(
            "/v1/compression/jobs",
            {
                "model": TINY_LLAMA,
                "method": "prune",
                # 10 steps of 4 of the 40 rows: one epoch of recovery.
                "options": {"sparsity": 0.5, "recovery_steps": 10, "batch_size": 4},
                "dataset": listing["dataset_version_id"],
            },
            format="json",
        )
    assert response.status_code == 200, response.content
    (spec,) = sent_compression_specs()

    reports = Reports()
    outcome = runner.run_compression(spec, reports, signal_reader=lambda: None)
    assert outcome.status == "succeeded", reports.of("failed")
    with captured(execute=True):
        assert {report_apply(r.to_json()) for r in reports.items} <= {"applied", "heartbeat"}
        # A duplicated success report credits nothing more.
        assert report_apply(reports.of("succeeded")[0].to_json()) == "duplicate"

    # The channels were fit to every row once, and recovery trained on each once more.
    trained = 2 * row_tokens()
    job = Job.objects.dangerously_unscoped().get(pk=response.json()["id"])
    assert job.trained_tokens == trained
    (usage,) = PartnerUsage.objects.for_organization(partner.organization)
    assert (usage.job_id, usage.trained_tokens) == (job.pk, trained)
    royalties = LedgerEntry.objects.for_organization(partner.organization).filter(
        meter=Meter.ROYALTY_TOKENS
    )
    assert list(royalties.values_list("quantity", "reference")) == [(trained, job.pk)]
    earned = partner.client.get("/v1/catalog/usage").json()
    assert earned["total_trained_tokens"] == trained
    # The customer pays the compression meter's per-job price, once.
    charges = LedgerEntry.objects.for_organization(alice.organization)
    assert list(charges.values_list("meter", "quantity")) == [(Meter.COMPRESSION_JOB, 1)]
