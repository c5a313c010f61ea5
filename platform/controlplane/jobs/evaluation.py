"""Evaluations: score one or more models the caller may use on one of their files, or on a
dataset version they may use (their own, or a partner's listing they hold a grant for).

An evaluation is a `Job` of kind `evaluation`: dispatched, leased, fenced, fair-queued,
cancelled, retried and reported exactly as the other kinds are (dispatch.py, reports.py).
What differs is here: the request and its checks, the spec the worker gets
(jobcontracts.evaluation), and what success makes: the per-model metrics (a side-by-side
table when several models are scored), a results File the caller downloads through the
Files API, and the tokens each model read, billed as inference prompt tokens.

Before it runs, an evaluation is priced: `estimated_tokens` are the data's tokens for each
model's tokenizer (each sequence cut where the worker cuts it), added up over the models,
and `estimated_price` those tokens at each model's inference prompt-token price in force
(the price book). What is billed is what the worker read (`usage.prompt_tokens`, `price`),
at the same prices. The count runs in the request, streaming the data once per distinct
tokenizer (Rust `tokenizers`, no torch).

The job's columns, reused: `test_file` is the file scored (or `dataset_version` the
version), `base_model` the first model's base, `hyperparameters` holds `models` (ids, in
the table's order) and the batch options, and `report` the metrics, rows, results file and
billed price once it succeeds.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final

import orjson
import structlog
from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone
from rest_framework import serializers

from controlplane.billing.ledger import ledger_append
from controlplane.billing.models import Meter
from controlplane.billing.prices import unit_prices
from controlplane.core.errors import ApiError, NotFound
from controlplane.core.ids import new_id
from controlplane.core.serializers import StrictInputSerializer, unix
from controlplane.datasets.models import DatasetVersion, File, FileStatus
from controlplane.datasets.storage import object_uri, open_object
from controlplane.datasets.validation import DEFAULT_MAX_LINE_BYTES, OTHER_LABEL, iter_lines
from controlplane.modelregistry.models import BaseModel, CustomerModel
from controlplane.modelregistry.selectors import model_for_organization
from controlplane.modelregistry.tokens import count_dataset_tokens, tokenizer_for
from controlplane.tenancy.models import Organization
from jobcontracts import evaluation as contract
from jobcontracts.compression import SourceRef
from jobcontracts.training import DataRef

from .events import event_add
from .files import data_summary, training_file_get, training_version_get
from .models import Job, JobKind, JobStatus
from .params import METADATA_VALUE_MAX, metadata_checked

log = structlog.get_logger(__name__)

#: File formats an evaluation scores, and the kind of model each is scored on.
TASK_OF_FORMAT: Final = {
    **dict.fromkeys(contract.LM_FORMATS, "causal_lm"),
    "preference": "causal_lm",
    "classification": "classification",
    contract.PAIRS_FORMAT: "embeddings",
}
MAX_SEQ_LEN: Final = 2048
#: What a base model can be scored as (a classifier is always a model fine-tuned as one).
BASE_KINDS: Final = ("causal_lm", "embeddings")
#: Money is kept to the micro-dollar (the jobs' price columns).
MICRO: Final = Decimal("0.000001")
#: Texts tokenized per `encode_batch` call when counting a pairs file.
_COUNT_BATCH: Final = 1024


def new_evaluation_job_id() -> str:
    return new_id("evaljob").replace("evaljob_", "evaljob-", 1)


class CreateEvaluationInput(StrictInputSerializer):
    model = serializers.CharField(
        max_length=300, required=False, help_text="One model to score (or give `models`)."
    )
    models = serializers.ListField(
        child=serializers.CharField(max_length=300),
        min_length=1,
        max_length=contract.MAX_MODELS,
        required=False,
        help_text="Models to score side by side on the same file (base, fine-tuned, compressed).",
    )
    file = serializers.CharField(
        max_length=64,
        required=False,
        help_text=(
            "A validated fine-tune file: chat, prompt_completion or text rows (loss, "
            "perplexity), classification rows (accuracy, macro-F1), preference rows "
            '(preference accuracy) or pairs rows, {"query", "positive"}, for '
            "embedding models (mean cosine, recall@1/5/10). Give `file` or `dataset`."
        ),
    )
    dataset = serializers.CharField(
        max_length=64,
        required=False,
        help_text=(
            "Or a ready dataset version to score on: your own, or a partner listing's "
            "version you hold an approved access grant for."
        ),
    )
    batch_size = serializers.IntegerField(min_value=1, max_value=256, default=8)
    metadata = serializers.DictField(
        child=serializers.CharField(max_length=METADATA_VALUE_MAX, allow_blank=True),
        required=False,
    )

    def validate_metadata(self, value: dict[str, str]) -> dict[str, str]:
        return metadata_checked(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("file" in attrs) == ("dataset" in attrs):
            raise serializers.ValidationError(
                {"file": ["Give one of 'file' (a file id) and 'dataset' (a dataset version id)."]}
            )
        if ("model" in attrs) == ("models" in attrs):
            raise serializers.ValidationError(
                {"models": ["Give 'model' (one id) or 'models' (a list of ids)."]}
            )
        names = attrs.pop("models", None) or [attrs.pop("model")]
        if len(set(names)) != len(names):
            raise serializers.ValidationError({"models": ["Give each model once."]})
        attrs["models"] = names
        return attrs


def _model(organization: Organization, model_id: str) -> BaseModel | CustomerModel:
    try:
        return model_for_organization(organization=organization, model_id=model_id)
    except NotFound as error:
        raise NotFound(str(error.detail), param="models", code="model_not_found") from None


def _kinds_of(model: BaseModel | CustomerModel) -> list[str]:
    """What the model can be scored as: a fine-tuned or compressed model is what it was
    made as; a base model, what it serves of causal_lm and embeddings."""
    if isinstance(model, CustomerModel):
        return [model.task]
    return [kind for kind in BASE_KINDS if kind in model.tasks]


def _check(
    model: BaseModel | CustomerModel, *, task: str, data_format: str, labels: list[str]
) -> None:
    kinds = _kinds_of(model)
    if task not in kinds:
        article = "an" if kinds and kinds[0][0] in "aeiou" else "a"
        have = (
            f"is {article} {' and '.join(kinds)} model"
            if kinds
            else f"can be scored as none of them (a base model is scored as "
            f"{' or '.join(BASE_KINDS)}; a classifier is one fine-tuned as one)"
        )
        raise ApiError(
            f"A '{data_format}' file is scored on {task} models; '{model.pk}' {have}.",
            param="models",
            code="unsupported_model",
        )
    if task == "classification":
        assert isinstance(model, CustomerModel)
        unknown = sorted(set(labels) - set(model.labels))
        if OTHER_LABEL in labels or unknown:
            raise ApiError(
                f"The file has labels the classifier '{model.pk}' does not know: "
                f"{', '.join(unknown[:5]) or 'more than 1000'}.",
                param="file",
                code="invalid_file",
            )


def job_build(*, organization: Organization, user_id: str | None, data: dict[str, Any]) -> Job:
    """Check everything the caller can get wrong, then create the job queued (runs in
    `services.evaluation_job_create`'s transaction, which dispatches it on commit)."""
    models = [_model(organization, name) for name in data["models"]]
    source: File | DatasetVersion
    if "dataset" in data:
        source, param = training_version_get(organization, data["dataset"]), "dataset"
        what = f"dataset version '{source.pk}'"
    else:
        source, param = training_file_get(organization, data["file"], "file"), "file"
        what = f"file '{source.pk}'"
    data_format, rows, labels = data_summary(source)
    if rows < 1:
        raise ApiError(f"The {what} has no rows.", param=param, code="empty_file")
    task = TASK_OF_FORMAT.get(data_format)
    if task is None:
        raise ApiError(
            f"A '{data_format}' file cannot be scored; give chat, prompt_completion, text, "
            "classification, preference or pairs rows.",
            param=param,
            code="invalid_file",
        )
    for model in models:
        _check(model, task=task, data_format=data_format, labels=labels)
    tokens, price = _estimate(models, source.storage_name, data_format)
    first = models[0]
    job = Job.objects.create(
        id=new_evaluation_job_id(),
        kind=JobKind.EVALUATION,
        organization=organization,
        base_model=first.base if isinstance(first, CustomerModel) else first,
        source_model=first if isinstance(first, CustomerModel) else None,
        test_file=source if isinstance(source, File) else None,
        dataset_version=source if isinstance(source, DatasetVersion) else None,
        estimated_tokens=tokens,
        estimated_price=price,
        data_format=data_format,
        seed=secrets.randbelow(2**31),
        metadata=data.get("metadata") or {},
        task=task,
        method="evaluate",
        hyperparameters={"models": [m.pk for m in models], "batch_size": data["batch_size"]},
        requested_hyperparameters={"batch_size": data["batch_size"]},
        labels=list(first.labels) if isinstance(first, CustomerModel) else [],
        status=JobStatus.QUEUED,
        queued_at=timezone.now(),
        created_by_id=user_id,
    )
    names = ", ".join(m.pk for m in models)
    event_add(job, f"Created evaluation: {job.pk} ({names} on {source.pk}, {rows} rows)")
    event_add(
        job,
        f"Estimated: {tokens} tokens read, {price} USD",
        data={"estimated_tokens": tokens, "estimated_price": str(price)},
    )
    event_add(job, "Evaluation queued")
    log.info("jobs.evaluation_created", job_id=job.pk, organization_id=organization.pk)
    return job


def retry_request(job: Job) -> dict[str, Any]:
    source: dict[str, str | None]
    if job.dataset_version_id:
        source = {"dataset": job.dataset_version_id}
    else:
        source = {"file": job.test_file_id}
    return {
        **source,
        "models": list(job.hyperparameters["models"]),
        "batch_size": int(job.hyperparameters.get("batch_size") or 8),
        "metadata": dict(job.metadata or {}),
    }


# --- the price estimate -----------------------------------------------------------------------


def _base_of(model: BaseModel | CustomerModel) -> BaseModel:
    return model.base if isinstance(model, CustomerModel) else model


def _context(models: list[BaseModel | CustomerModel]) -> int:
    """The sequence limit of the spec: the shortest context of the models (at most 2048)."""
    return min([MAX_SEQ_LEN] + [_base_of(m).context_length for m in models])


def prompt_price(model_id: str, at: datetime) -> Decimal:
    """USD per inference prompt token of `model_id`, in force at `at` (0 where unpriced):
    the price the ledger's rating gives the entry."""
    (price,) = unit_prices(model_id, [Meter.PROMPT_TOKENS], at)
    return price


def _pair_tokens(base: BaseModel, storage_name: str) -> int:
    """Tokens an embedding model reads of a pairs file: each query and positive with the
    tokenizer's special tokens, cut at the model's limit (as the worker embeds them)."""
    tokenizer = tokenizer_for(base)
    limit = min(contract.EMBED_MAX_TOKENS, base.context_length)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets
    total = 0
    texts: list[str] = []

    def flush() -> None:
        nonlocal total
        if texts:
            total += sum(min(len(e.ids), limit) for e in encode(texts, add_special_tokens=True))
            texts.clear()

    with open_object(storage_name) as stream:
        for _, line in iter_lines(stream, max_line_bytes=DEFAULT_MAX_LINE_BYTES):
            if line is None or not line.strip():
                continue
            row = orjson.loads(line)  # a validated file: every row parses
            texts.extend(str(row[key]) for key in ("query", "positive"))
            if len(texts) >= _COUNT_BATCH:
                flush()
    flush()
    return total


def _estimate(
    models: list[BaseModel | CustomerModel], storage_name: str, data_format: str
) -> tuple[int, Decimal]:
    """(tokens the models will read, their price): the data counted once per tokenizer
    (each base model's), each model's tokens at its own prompt-token price."""
    counted: dict[str, int] = {}
    limit = _context(models)
    now = timezone.now()
    tokens, price = 0, Decimal(0)
    for model in models:
        base = _base_of(model)
        if base.uri not in counted:
            if data_format == contract.PAIRS_FORMAT:
                counted[base.uri] = _pair_tokens(base, storage_name)
            else:
                stats = count_dataset_tokens(
                    base=base, storage_name=storage_name, format=data_format, max_seq_len=limit
                )
                counted[base.uri] = stats.trained_tokens
        tokens += counted[base.uri]
        price += counted[base.uri] * prompt_price(model.pk, now)
    return tokens, price.quantize(MICRO, rounding=ROUND_HALF_UP)


# --- dispatch and success (called by dispatch.py and reports.py) ----------------------------


def _ref(model: BaseModel | CustomerModel) -> SourceRef:
    if isinstance(model, BaseModel):
        return SourceRef(name=model.pk, uri=model.uri, family=model.family)
    base = model.base
    if model.artifact_kind == "lora":
        return SourceRef(
            name=model.pk,
            uri=base.uri,
            family=base.family,
            adapter_uri=model.uri,
            labels=tuple(model.labels),
        )
    return SourceRef(name=model.pk, uri=model.uri, family=base.family, labels=tuple(model.labels))


def models_of(job: Job) -> list[BaseModel | CustomerModel]:
    """The job's models as they are now: one deleted since is a `model_not_found`."""
    return [_model(job.organization, name) for name in job.hyperparameters["models"]]


def build_spec(job: Job, *, output_uri: str, control_uri: str) -> contract.EvaluationSpec:
    """The worker's spec, with each model as it is now (`models_of`)."""
    source = job.test_file or job.dataset_version
    assert source is not None
    models = models_of(job)
    context = _context(models)
    return contract.EvaluationSpec(
        job_id=job.pk,
        attempt=job.attempt,
        organization_id=job.organization_id,
        task=job.task,
        models=tuple(_ref(m) for m in models),
        data=DataRef(uri=object_uri(source.storage_name), format=job.data_format),
        output_uri=output_uri,
        control_uri=control_uri,
        batch_size=int(job.hyperparameters.get("batch_size") or 8),
        max_seq_len=context,
        heartbeat_seconds=settings.JOBS_HEARTBEAT_SECONDS,
    )


def evaluation_succeeded(job: Job, d: dict[str, Any], *, prefix: str) -> None:
    """Store the metrics, make the results a File of the caller's, bill the tokens once.
    `d["artifact_uri"]` is under the job's storage `prefix` (reports.py refuses others)."""
    if job.report is not None:
        return
    name = prefix + str(d["artifact_uri"])[len(object_uri(prefix)) :]
    digest = hashlib.sha256()
    size = 0
    with default_storage.open(name, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    rows = int(d.get("rows") or 0)
    output = File.objects.create(
        organization_id=job.organization_id,
        filename=f"{job.pk}-results.jsonl",
        purpose="evals",
        bytes=size,
        sha256=digest.hexdigest(),
        storage_name=name,
        status=FileStatus.PROCESSED,
        validation={"format": "evaluation_results", "rows": rows},
        created_by_id=job.created_by_id,
    )
    names = list(job.hyperparameters["models"])
    metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
    tokens = d.get("tokens") if isinstance(d.get("tokens"), dict) else {}
    assert isinstance(metrics, dict)
    assert isinstance(tokens, dict)
    read = {n: int(tokens.get(n) or 0) for n in names}
    now = timezone.now()
    # What the ledger entries below cost at the prices in force when they occur.
    price = sum((read[n] * prompt_price(n, now) for n in names), Decimal(0))
    job.report = {
        "rows": rows,
        "metrics": {n: metrics.get(n) for n in names},
        "tokens": read,
        "output_file_id": output.pk,
        "price": str(price.quantize(MICRO, rounding=ROUND_HALF_UP)),
    }
    job.trained_tokens = sum(job.report["tokens"].values())
    for index, model in enumerate(names):
        # The tokens each model read, as its inference prompt tokens (priced per model).
        ledger_append(
            organization_id=job.organization_id,
            idempotency_key=f"evaluation:{job.pk}:{index}",
            meter=Meter.PROMPT_TOKENS,
            quantity=job.report["tokens"][model],
            occurred_at=now,
            source="jobs.evaluation",
            model=model,
            reference=job.pk,
            engagement_id=job.engagement_id,
        )


def evaluation_out(job: Job) -> dict[str, Any]:
    report = job.report or {}
    names = list(job.hyperparameters.get("models") or [])
    metrics = report.get("metrics") or {}
    return {
        "id": job.pk,
        "object": "evaluation",
        "created_at": unix(job.created_at),
        "status": job.status,
        "error": job.error,
        "file": job.test_file_id,
        "dataset": job.dataset_version_id,
        "format": job.data_format,
        "models": names,
        "metrics": metrics or None,
        # One row per model, in the order asked: the side-by-side table.
        "table": [{"model": n, **(metrics.get(n) or {})} for n in names] if metrics else None,
        "rows": report.get("rows"),
        "usage": {"prompt_tokens": job.trained_tokens} if job.trained_tokens is not None else None,
        # Before it runs: the tokens the models will read and their price (USD); after,
        # `usage` and `price` are what was read and billed.
        "estimated_tokens": job.estimated_tokens,
        "estimated_price": None if job.estimated_price is None else str(job.estimated_price),
        "price": report.get("price"),
        "output_file_id": report.get("output_file_id"),
        "metadata": job.metadata or None,
        "organization_id": job.organization_id,
        "started_at": unix(job.started_at),
        "finished_at": unix(job.finished_at),
        "progress": {"step": job.current_step, "total_steps": job.total_steps},
        "attempt": job.attempt,
    }
