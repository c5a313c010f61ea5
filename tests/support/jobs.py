"""Fine-tuning test helpers: base models, training files, broker messages, fake reports."""

from __future__ import annotations

import io
import json
import os
import time
from decimal import Decimal
from typing import Any

import redis

from jobcontracts import queues
from jobcontracts.compression import CompressionSpec
from jobcontracts.evaluation import EvaluationSpec
from jobcontracts.training import Report, TrainingSpec

from .models import tiny_model_dir
from .people import Person

TINY_LLAMA = "atelier-tiny-llama"


def register_tiny_llama(*, real: bool = True) -> Any:
    """The tiny Llama-style base model (built locally) in the registry."""
    from controlplane.modelregistry.models import BaseModel

    uri = tiny_model_dir("llama").as_uri() if real else "file:///nonexistent/model"
    base, _ = BaseModel.objects.update_or_create(
        id=TINY_LLAMA,
        defaults={
            "family": "llama",
            "tasks": ["causal_lm", "classification"],
            "methods": ["supervised", "dpo"],
            "adapters": ["lora", "full"],
            "context_length": 256,
            "uri": uri,
            "price_per_1k_training_tokens": Decimal("0.008"),
        },
    )
    return base


def chat_rows(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"where is my order number {i}"},
                    {"role": "assistant", "content": "your order has shipped it will arrive"},
                ]
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def upload_file(person: Person, content: bytes, captured: Any, name: str = "t.jsonl") -> str:
    """Upload and validate (on-commit callbacks run inline) a fine-tune file."""
    f = io.BytesIO(content)
    f.name = name
    with captured(execute=True):
        response = person.client.post(
            "/v1/files", {"file": f, "purpose": "fine-tune"}, format="multipart"
        )
    assert response.status_code == 200, response.content
    return str(response.json()["id"])


def create_job(person: Person, captured: Any, **body: Any) -> Any:
    with captured(execute=True):
        return person.client.post("/v1/fine_tuning/jobs", body, format="json")


def _broker() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))


def purge_broker() -> None:
    """Forget messages earlier tests left on the job queues (kombu keeps a list per queue)."""
    _broker().delete(
        queues.GPU_TRAINING, queues.GPU_COMPRESSION, queues.GPU_INFERENCE, queues.CONTROL
    )


def _sent(queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(task name, first argument) of each message in a broker queue, oldest first."""
    import base64

    raw = _broker().lrange(queue, 0, -1)
    sent = []
    for item in reversed(raw):  # kombu LPUSHes: the oldest message is last
        message = json.loads(item)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        sent.append((str(message.get("headers", {}).get("task")), args[0]))
    return sent


def sent_specs() -> list[TrainingSpec]:
    """Training specs in the broker's gpu.training queue, oldest first."""
    return [
        TrainingSpec.from_json(args)
        for task, args in _sent(queues.GPU_TRAINING)
        if task == queues.TRAIN
    ]


def sent_evaluation_specs() -> list[EvaluationSpec]:
    """Evaluation specs (task EVALUATE, on the gpu.training queue), oldest first."""
    return [
        EvaluationSpec.from_json(args)
        for task, args in _sent(queues.GPU_TRAINING)
        if task == queues.EVALUATE
    ]


def sent_compression_specs() -> list[CompressionSpec]:
    """Compression specs in the broker's gpu.compression queue (task COMPRESS), oldest first."""
    sent = _sent(queues.GPU_COMPRESSION)
    assert all(task == queues.COMPRESS for task, _ in sent), sent
    return [CompressionSpec.from_json(args) for _, args in sent]


class Worker:
    """Plays a GPU worker's side of the contract by applying reports directly."""

    def __init__(self, job_id: str, attempt: int) -> None:
        self.job_id, self.attempt, self.seq = job_id, attempt, 0

    def report(self, kind: str, **data: Any) -> str:
        from controlplane.jobs.reports import report_apply

        report = Report(self.job_id, self.attempt, self.seq, kind, time.time(), data)
        self.seq += 1
        return report_apply(report.to_json())

    def uri(self, *names: str) -> str:
        """A URI under the job's own storage prefix (its spec's `output_uri`), as a worker
        names its checkpoints and final artifact: reports naming anything else are refused."""
        from controlplane.datasets.storage import object_uri
        from controlplane.jobs.dispatch import job_prefix
        from controlplane.jobs.models import Job

        job = Job.objects.dangerously_unscoped().get(pk=self.job_id)
        return "/".join([object_uri(job_prefix(job)), *names])
