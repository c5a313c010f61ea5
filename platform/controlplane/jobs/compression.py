"""Compression jobs: quantize, prune or distill a model into a smaller one, with a report.

A compression job is a `Job` of kind `compression`: it is dispatched, leased, fenced,
fair-queued, cancelled, retried and reported exactly as a fine-tuning job is (dispatch.py,
reports.py). What differs is here: the request and its options, the checks made before
anything is stored, the price and ETA, the spec the worker gets
(jobcontracts.compression), and what success registers: a compressed customer model,
one ledger entry on the compression meter, and the worker's before/after report.

Supported pairs (the worker implements these and no others):
- quantize: every servable source (gpt2, llama, bert and the like: it swaps Linear and
  embedding weights); int8 on any worker, bf16/fp8 on CUDA workers;
- prune, distill: the families whose structure the worker knows (`STRUCTURED_FAMILIES`),
  and never an already-quantized model (they train, on full-precision weights).

Held-out test data: `test_file` (any method), or `options.test_fraction` of the training
rows (prune and distill with training data: the rows `held_out_rows(rows, fraction,
seed)` names are held out by the worker before the method calibrates or trains on any
row). Quantization trains on nothing and takes no training data, so it takes a
`test_file` only. At the end the worker scores the source and the result on the test
rows (jobcontracts.compression): the result's scores become the job's `test_metrics`,
the source's are in the report next to them.
"""

from __future__ import annotations

import math
import secrets
from decimal import Decimal
from typing import Any, Final

import structlog
from django.conf import settings
from django.utils import timezone
from rest_framework import serializers

from controlplane.billing import meters
from controlplane.billing.models import Meter
from controlplane.billing.prices import unit_prices
from controlplane.core.errors import ApiError
from controlplane.core.ids import new_compression_job_id
from controlplane.core.serializers import StrictInputSerializer
from controlplane.datasets.models import DatasetVersion, File
from controlplane.datasets.storage import object_uri
from controlplane.modelregistry import artifacts
from controlplane.modelregistry.models import BaseModel, CustomerModel, ModelKind
from controlplane.modelregistry.selectors import model_for_organization
from controlplane.modelregistry.services import ENCODER_FAMILIES, customer_model_register
from controlplane.modelregistry.tokens import tokenizer_for
from controlplane.tenancy.models import Organization
from jobcontracts import compression as contract
from jobcontracts.training import MAX_TEST_FRACTION, DataRef, held_out_count

from .events import event_add
from .files import data_summary, training_file_get, training_version_get
from .models import Job, JobKind, JobStatus
from .params import (
    METADATA_VALUE_MAX,
    SUFFIX_RE,
    metadata_checked,
)
from .signals import job_succeeded

log = structlog.get_logger(__name__)

#: Families whose heads, channels and layers the worker can remove or re-initialise.
STRUCTURED_FAMILIES: Final = ("bert", "gpt2", "llama")
#: Training-data formats each task can learn from when recovering or distilling.
TRAINING_FORMATS: Final = {
    "causal_lm": ("chat", "prompt_completion", "text"),
    "embeddings": ("text", "chat", "prompt_completion"),
    "classification": ("classification",),
}
#: Formats of held-out test rows the worker scores each task on (an embedding model is
#: compared to its source on texts: labelled rows say nothing more).
TEST_FORMATS: Final = {
    "causal_lm": ("chat", "prompt_completion", "text"),
    "embeddings": ("text", "chat", "prompt_completion"),
    "classification": ("classification",),
}
#: Per-row generation when distilling without a training file.
MAX_STEPS: Final = 20_000
#: Test metrics a compression job keeps, by task (besides "test_rows").
TEST_METRICS: Final = {
    "causal_lm": ("test_loss", "test_perplexity"),
    "classification": ("test_accuracy", "test_macro_f1"),
    "embeddings": (
        "test_cosine_to_source",
        "test_recall_at_1",
        "test_recall_at_5",
        "test_recall_at_10",
    ),
}
TEST_FRACTION_HELP: Final = (
    "Our extension: hold out this fraction of the training rows, in (0, 0.5], as a test set "
    "(chosen by the job's seed; never calibrated or trained on); the source and the result "
    "are scored on it at the end. Needs 'training_file' or 'dataset'; not with 'test_file'."
)


def _choice(choices: tuple[str, ...], **kwargs: Any) -> serializers.ChoiceField:
    """A choice whose error lists the choices (DRF's only says it is not valid)."""
    message = f'"{{input}}" is not supported; use one of: {", ".join(choices)}.'
    return serializers.ChoiceField(choices, error_messages={"invalid_choice": message}, **kwargs)


def _test_fraction() -> serializers.FloatField:
    return serializers.FloatField(required=False, help_text=TEST_FRACTION_HELP)


def _test_fraction_checked(value: float) -> float:
    if not 0.0 < value <= MAX_TEST_FRACTION:
        raise serializers.ValidationError(
            f"Must be greater than 0 and at most {MAX_TEST_FRACTION} (the fraction of the "
            f"training rows held out as a test set); got {value:g}."
        )
    return value


class QuantizeOptions(StrictInputSerializer):
    weights = _choice(contract.QUANTIZE_WEIGHTS, default="int8")
    test_fraction = _test_fraction()

    def validate_test_fraction(self, value: float) -> float:
        raise serializers.ValidationError(
            "Quantization trains on no rows, so there are none to hold out: give a held-out "
            "'test_file' to score the source and the result on."
        )


class PruneOptions(StrictInputSerializer):
    sparsity = serializers.FloatField()
    target = _choice(contract.PRUNE_TARGETS, default="heads_and_channels")
    recovery_steps = serializers.IntegerField(min_value=0, max_value=MAX_STEPS, required=False)
    learning_rate = serializers.FloatField(min_value=1e-7, max_value=1e-2, default=1e-4)
    batch_size = serializers.IntegerField(min_value=1, max_value=256, default=8)
    max_seq_len = serializers.IntegerField(min_value=8, max_value=8192, default=128)
    test_fraction = _test_fraction()

    def validate_test_fraction(self, value: float) -> float:
        return _test_fraction_checked(value)

    def validate_sparsity(self, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise serializers.ValidationError(
                f"must be strictly between 0 and 1 (the fraction of prunable weights to "
                f"remove, e.g. 0.3); got {value:g}."
            )
        return value


class DistillOptions(StrictInputSerializer):
    student_layers = serializers.IntegerField(min_value=1, max_value=1024, required=False)
    student_model = serializers.CharField(max_length=300, required=False)
    temperature = serializers.FloatField(min_value=0.5, max_value=20.0, default=2.0)
    alpha = serializers.FloatField(min_value=0.0, max_value=1.0, default=0.5)
    steps = serializers.IntegerField(min_value=1, max_value=MAX_STEPS, default=200)
    learning_rate = serializers.FloatField(min_value=1e-7, max_value=1e-2, default=5e-4)
    batch_size = serializers.IntegerField(min_value=1, max_value=256, default=8)
    max_seq_len = serializers.IntegerField(min_value=8, max_value=8192, default=128)
    generated_rows = serializers.IntegerField(min_value=1, max_value=10_000, default=64)
    test_fraction = _test_fraction()

    def validate_test_fraction(self, value: float) -> float:
        return _test_fraction_checked(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "student_layers" in attrs and "student_model" in attrs:
            raise serializers.ValidationError(
                {"student_layers": ["Give 'student_layers' or 'student_model', not both."]}
            )
        return attrs


OPTIONS: Final[dict[str, type[StrictInputSerializer]]] = {
    "quantize": QuantizeOptions,
    "prune": PruneOptions,
    "distill": DistillOptions,
}


class CreateCompressionJobInput(StrictInputSerializer):
    model = serializers.CharField(max_length=300)
    method = _choice(contract.METHODS)
    options = serializers.DictField(
        required=False,
        default=dict,
        help_text=(
            "The method's options. quantize: weights. prune: sparsity, target, recovery_steps, "
            "learning_rate, batch_size, max_seq_len, test_fraction. distill: student_layers "
            "| student_model, temperature, alpha, steps, learning_rate, batch_size, "
            "max_seq_len, generated_rows, test_fraction. `test_fraction` (our extension, "
            "prune and distill with training data): hold out this fraction of the training "
            "rows, in (0, 0.5], as a test set chosen by the job's seed, never calibrated or "
            "trained on; not with `test_file`."
        ),
    )
    task = _choice(contract.TASKS, required=False)
    training_file = serializers.CharField(max_length=64, required=False)
    dataset = serializers.CharField(max_length=64, required=False)
    validation_file = serializers.CharField(max_length=64, required=False)
    test_file = serializers.CharField(
        max_length=64,
        required=False,
        help_text=(
            "Our extension: a fine-tune file held out as a test set, in the format of the "
            "job's training (or validation) data: the source and the compressed model are "
            "scored on it at the end (the result's scores in `test_metrics`, the source's in "
            "`source_test_metrics`); never calibrated or trained on. Any method; not with "
            "`options.test_fraction`."
        ),
    )
    suffix = serializers.CharField(max_length=64, required=False, allow_blank=True)
    seed = serializers.IntegerField(min_value=0, max_value=2**31 - 1, required=False)
    metadata = serializers.DictField(
        child=serializers.CharField(max_length=METADATA_VALUE_MAX, allow_blank=True),
        required=False,
    )

    def validate_suffix(self, value: str) -> str:
        if value and not SUFFIX_RE.match(value):
            raise serializers.ValidationError(
                "Use 1 to 64 letters, digits, '-' or '_' (it becomes part of the model id)."
            )
        return value

    def validate_metadata(self, value: dict[str, str]) -> dict[str, str]:
        return metadata_checked(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "training_file" in attrs and "dataset" in attrs:
            raise serializers.ValidationError(
                {"training_file": ["Give 'training_file' or 'dataset', not both."]}
            )
        options = OPTIONS[attrs["method"]](data=attrs.get("options") or {})
        if not options.is_valid():
            raise serializers.ValidationError({"options": options.errors})
        attrs["options"] = dict(options.validated_data)
        return attrs


# --- checks -------------------------------------------------------------------------------


def _source(
    organization: Organization, model_id: str, engagement_id: str | None = None
) -> tuple[BaseModel, CustomerModel | None]:
    model = model_for_organization(
        organization=organization, model_id=model_id, engagement_id=engagement_id
    )
    if isinstance(model, BaseModel):
        return model, None
    return model.base, model


def _task(base: BaseModel, source: CustomerModel | None, asked: str | None) -> str:
    if source is not None:
        if asked is not None and asked != source.task:
            raise ApiError(
                f"The model '{source.pk}' is a {source.task} model; a compressed copy does "
                f"what its source does (drop 'task' or give '{source.task}').",
                param="task",
                code="unsupported_task",
            )
        return source.task
    servable = [t for t in ("causal_lm", "embeddings") if t in base.tasks]
    if asked is None:
        if not servable:
            raise ApiError(
                f"The base model '{base.pk}' serves none of causal_lm, embeddings; compress "
                "a classifier you fine-tuned from it instead.",
                param="model",
                code="unsupported_model",
            )
        # An encoder embeds; anything else generates.
        return (
            "embeddings"
            if base.family in ENCODER_FAMILIES and "embeddings" in servable
            else (servable[0])
        )
    if asked not in servable:
        hint = (
            "compress a classifier you fine-tuned from it"
            if asked == "classification"
            else f"it serves: {', '.join(servable) or 'nothing compressible'}"
        )
        raise ApiError(
            f"The base model '{base.pk}' cannot be compressed as a {asked} model ({hint}).",
            param="task",
            code="unsupported_task",
        )
    return asked


def _check_pair(method: str, base: BaseModel, source: CustomerModel | None, name: str) -> None:
    if source is not None and source.quantized:
        origin = (source.compression or {}).get("source")
        raise ApiError(
            f"The model '{name}' is already quantized; {method} needs full-precision weights. "
            f"Compress its source '{origin}' instead (prune or distill first, then quantize).",
            param="model",
            code="model_already_quantized",
        )
    if method in ("prune", "distill") and base.family not in STRUCTURED_FAMILIES:
        raise ApiError(
            f"Method '{method}' is not supported for '{name}' (family '{base.family}'). "
            f"Supported: quantize for every model; prune and distill for the families "
            f"{', '.join(STRUCTURED_FAMILIES)}.",
            param="method",
            code="unsupported_method",
        )


def _data(
    organization: Organization, data: dict[str, Any], *, task: str, method: str
) -> tuple[File | None, DatasetVersion | None, str, int]:
    """The training rows (file or dataset version): (file, version, format, rows)."""
    if "training_file" not in data and "dataset" not in data:
        return None, None, "", 0
    param = "training_file" if "training_file" in data else "dataset"
    if method == "quantize":
        raise ApiError(
            "Quantization does not train: drop 'training_file'/'dataset' (give "
            "'validation_file' to measure quality on your own rows).",
            param=param,
            code="invalid_training_file",
        )
    file: File | None = None
    version: DatasetVersion | None = None
    source: File | DatasetVersion
    if param == "training_file":
        file = source = training_file_get(organization, data["training_file"], "training_file")
    else:
        version = source = training_version_get(organization, data["dataset"])
    data_format, rows, _ = data_summary(source)
    allowed = TRAINING_FORMATS[task]
    if data_format not in allowed:
        raise ApiError(
            f"A {task} model recovers or distils on {' or '.join(allowed)} data; this data "
            f"is '{data_format}'.",
            param=param,
            code="invalid_training_file",
        )
    if rows < 1:
        raise ApiError("The training data has no rows.", param=param, code="empty_file")
    return file, version, data_format, rows


def _validation(organization: Organization, data: dict[str, Any], *, task: str) -> File | None:
    if not data.get("validation_file"):
        return None
    file = training_file_get(organization, data["validation_file"], "validation_file")
    data_format = data_summary(file)[0]
    allowed = TRAINING_FORMATS[task]
    if data_format not in allowed:
        raise ApiError(
            f"Quality of a {task} model is measured on {' or '.join(allowed)} data; this file "
            f"is '{data_format}'.",
            param="validation_file",
            code="invalid_validation_file",
        )
    return file


def _test_file(
    organization: Organization,
    data: dict[str, Any],
    *,
    task: str,
    data_format: str,
    validation_file: File | None,
) -> File | None:
    """The held-out test file: the caller's, with rows, in the job's data format (the
    training data's, else the validation file's, else one the task is measured on)."""
    if not data.get("test_file"):
        return None
    file_id = data["test_file"]
    file = training_file_get(organization, file_id, "test_file")
    test_format, test_rows, _ = data_summary(file)
    if test_rows < 1:
        raise ApiError(
            f"The test file '{file_id}' has no rows.", param="test_file", code="empty_file"
        )
    expected = data_format or (data_summary(validation_file)[0] if validation_file else "")
    if expected and test_format != expected:
        which = "training" if data_format else "validation"
        raise ApiError(
            f"The test file must have the same format as the {which} data ('{expected}'); "
            f"'{file_id}' is '{test_format}'.",
            param="test_file",
            code="invalid_test_file",
        )
    allowed = TEST_FORMATS[task]
    if test_format not in allowed:
        raise ApiError(
            f"A {task} model is tested on {' or '.join(allowed)} data; '{file_id}' is "
            f"'{test_format}'.",
            param="test_file",
            code="invalid_test_file",
        )
    return file


def _test_fraction_rows(options: dict[str, Any], *, rows: int) -> None:
    """Check a `test_fraction` split leaves rows to train on (the worker holds them out)."""
    fraction = options.get("test_fraction")
    if fraction is None:
        return
    if not rows:
        raise ApiError(
            "test_fraction holds out some of the training rows: give 'training_file' (or "
            "'dataset'), or a held-out 'test_file' instead.",
            param="options.test_fraction",
            code="missing_training_file",
        )
    if held_out_count(rows, float(fraction)) < 1:
        raise ApiError(
            f"test_fraction {fraction} would leave no rows to train on: the training data has "
            f"{rows} row{'s' if rows != 1 else ''}. Upload more rows, or give a 'test_file'.",
            param="options.test_fraction",
            code="invalid_test_fraction",
        )


def _weights_uri(base: BaseModel, source: CustomerModel | None) -> str:
    """Where the source's architecture is described: its own directory, or its base's."""
    if source is not None and source.artifact_kind == "full":
        return source.uri
    return base.uri


def _shape(uri: str, param: str) -> artifacts.ModelShape:
    try:
        return artifacts.model_shape(uri)
    except (OSError, ValueError) as error:
        raise ApiError(
            f"The model's files cannot be read ({error}); it cannot be compressed now.",
            param=param,
            code="model_unavailable",
            status_code=409,
        ) from None


def _distill_student(
    organization: Organization, options: dict[str, Any], *, base: BaseModel, teacher_uri: str
) -> BaseModel | None:
    """Check the student is smaller than its teacher; the chosen student base, if any."""
    teacher = _shape(teacher_uri, "model")
    if "student_model" in options:
        student = model_for_organization(
            organization=organization, model_id=options["student_model"]
        )
        if not isinstance(student, BaseModel):
            raise ApiError(
                "'student_model' must be a base model (a smaller one of the same tokenizer).",
                param="options.student_model",
                code="invalid_student",
            )
        shape = _shape(student.uri, "options.student_model")
        if tokenizer_for(student).get_vocab() != tokenizer_for(base).get_vocab():
            raise ApiError(
                f"The student '{student.pk}' has another tokenizer than '{base.pk}'; distilling "
                "onto it needs the same vocabulary.",
                param="options.student_model",
                code="invalid_student",
            )
        if (shape.parameters or 0) >= (teacher.parameters or 0):
            raise ApiError(
                f"The student '{student.pk}' ({shape.parameters:,} parameters) is not smaller "
                f"than its teacher ({teacher.parameters:,}).",
                param="options.student_model",
                code="invalid_student",
            )
        return student
    layers = teacher.layers or 0
    if "student_layers" not in options:
        options["student_layers"] = max(1, layers // 2)
    if options["student_layers"] >= layers:
        raise ApiError(
            f"A student needs fewer layers than its teacher ({layers}); got "
            f"{options['student_layers']}.",
            param="options.student_layers",
            code="invalid_student",
        )
    return None


def estimate(
    *, base: BaseModel, method: str, options: dict[str, Any], parameters: int
) -> tuple[Decimal, int]:
    """(price, seconds) before the job starts.

    The price is the compression meter's per-job price for the base model. The time is a
    deliberate over-estimate from the work's size: loading and measuring both models
    (a few forwards of each) plus, for training methods, 6 * parameters * tokens
    floating-point operations at `JOBS_COMPRESSION_FLOPS` (a CPU core's worth by default).
    """
    (price,) = unit_prices(base.pk, [Meter.COMPRESSION_JOB], timezone.now())
    flops = float(settings.JOBS_COMPRESSION_FLOPS)
    measure = 2 * 40 * 2 * parameters * 16 * 128 / flops  # 2 models, ~40 forwards at b16
    steps = int(options.get("recovery_steps") or options.get("steps") or 0)
    tokens = steps * int(options.get("batch_size") or 8) * int(options.get("max_seq_len") or 128)
    train = 6 * parameters * tokens / flops * (2 if method == "distill" else 1.5)
    return Decimal(price).quantize(Decimal("0.000001")), math.ceil(30 + measure + train)


# --- create -------------------------------------------------------------------------------


def job_build(
    *,
    organization: Organization,
    user_id: str | None,
    data: dict[str, Any],
    engagement_id: str | None = None,
) -> Job:
    """Check everything the caller can get wrong, then create the job queued. Runs inside
    `services.compression_job_create`'s transaction, which dispatches it on commit.
    An engagement's job may compress that engagement's models not yet delivered."""
    method = data["method"]
    options = dict(data["options"])
    if data.get("test_file") and "test_fraction" in options:
        raise ApiError(
            "Give a held-out 'test_file' or 'options.test_fraction', not both.",
            param="test_file",
            code="invalid_test_file",
        )
    base, source = _source(organization, data["model"], engagement_id)
    name = source.pk if source is not None else base.pk
    task = _task(base, source, data.get("task"))
    _check_pair(method, base, source, name)
    training_file, version, data_format, rows = _data(organization, data, task=task, method=method)
    validation_file = _validation(organization, data, task=task)
    test_file = _test_file(
        organization, data, task=task, data_format=data_format, validation_file=validation_file
    )
    _test_fraction_rows(options, rows=rows)
    weights_uri = _weights_uri(base, source)
    student = None
    if method == "distill":
        student = _distill_student(organization, options, base=base, teacher_uri=weights_uri)
    if method == "prune":
        options.setdefault("recovery_steps", 60 if rows else 0)
        if options["recovery_steps"] and not rows:
            raise ApiError(
                "Recovery fine-tunes on your rows: give 'training_file' (or 'dataset'), or set "
                "'recovery_steps' to 0.",
                param="options.recovery_steps",
                code="missing_training_file",
            )
    if student is not None:
        options["student_model"] = student.pk
    parameters = _shape(weights_uri, "model").parameters or 0
    price, seconds = estimate(base=base, method=method, options=options, parameters=parameters)
    now = timezone.now()
    job = Job.objects.create(
        id=new_compression_job_id(),
        kind=JobKind.COMPRESSION,
        organization=organization,
        base_model=base,
        source_model=source,
        training_file=training_file,
        validation_file=validation_file,
        test_file=test_file,
        dataset_version=version,
        data_format=data_format,
        suffix=data.get("suffix") or "",
        seed=data["seed"] if data.get("seed") is not None else secrets.randbelow(2**31),
        metadata=data.get("metadata") or {},
        task=task,
        method=method,
        hyperparameters=options,
        requested_hyperparameters=dict(data["options"]),
        labels=list(source.labels) if source is not None else [],
        status=JobStatus.QUEUED,
        queued_at=now,
        estimated_price=price,
        estimated_seconds=seconds,
        created_by_id=user_id,
        engagement_id=engagement_id,
    )
    event_add(job, f"Created compression job: {job.pk} ({method} of {name})")
    event_add(
        job,
        f"Estimated price {price}, about {seconds} s once started",
        data={
            "estimated_price": str(price),
            "estimated_seconds": seconds,
            "parameters": parameters,
        },
    )
    event_add(job, "Compression job queued")
    log.info("jobs.compression_created", job_id=job.pk, organization_id=organization.pk)
    return job


# --- dispatch and success (called by dispatch.py and reports.py) ----------------------------


def build_spec(job: Job, *, output_uri: str, control_uri: str) -> contract.CompressionSpec:
    base = job.base_model
    source = job.source_model
    if source is not None and source.artifact_kind == "lora":
        ref = contract.SourceRef(
            name=source.pk,
            uri=base.uri,
            family=base.family,
            adapter_uri=source.uri,
            labels=tuple(job.labels),
        )
    else:
        ref = contract.SourceRef(
            name=source.pk if source is not None else base.pk,
            uri=_weights_uri(base, source),
            family=base.family,
            labels=tuple(job.labels),
        )
    student = None
    if job.hyperparameters.get("student_model"):
        chosen = BaseModel.objects.get(pk=job.hyperparameters["student_model"])
        student = contract.SourceRef(name=chosen.pk, uri=chosen.uri, family=chosen.family)
    source_data = job.training_file or job.dataset_version
    options = dict(job.hyperparameters)
    test_fraction = float(options.pop("test_fraction", 0.0) or 0.0)
    return contract.CompressionSpec(
        job_id=job.pk,
        attempt=job.attempt,
        organization_id=job.organization_id,
        task=job.task,
        method=job.method,
        source=ref,
        options=options,
        output_uri=output_uri,
        control_uri=control_uri,
        seed=int(job.seed),
        training_data=(
            DataRef(uri=object_uri(source_data.storage_name), format=job.data_format)
            if source_data is not None
            else None
        ),
        validation_data=(
            DataRef(
                uri=object_uri(job.validation_file.storage_name),
                format=str((job.validation_file.validation or {}).get("format") or ""),
            )
            if job.validation_file is not None
            else None
        ),
        student=student,
        test_data=(
            DataRef(
                uri=object_uri(job.test_file.storage_name),
                format=str((job.test_file.validation or {}).get("format") or ""),
            )
            if job.test_file is not None
            else None
        ),
        test_fraction=test_fraction,
        heartbeat_seconds=settings.JOBS_HEARTBEAT_SECONDS,
    )


def compression_succeeded(job: Job, d: dict[str, Any]) -> None:
    """Register the compressed model, store the report, bill the job once."""
    source_name = job.source_model_id or job.base_model_id
    base = job.base_model
    if job.hyperparameters.get("student_model"):
        base = BaseModel.objects.get(pk=job.hyperparameters["student_model"])
    compression: dict[str, Any] = {"method": job.method, "source": source_name}
    if job.method == "quantize":
        compression["weights"] = job.hyperparameters.get("weights", "int8")
    model = customer_model_register(
        organization=job.organization,
        base=base,
        job_id=job.pk,
        suffix=job.suffix,
        kind=ModelKind.COMPRESSED,
        step=None,
        uri=str(d["artifact_uri"]),
        artifact_kind="full",
        task=job.task,
        labels=job.labels,
        compression=compression,
        engagement_id=job.engagement_id,
    )
    job.fine_tuned_model = model.pk
    report = d.get("report")
    job.report = report if isinstance(report, dict) else None
    job.test_metrics = _test_scores(job.task, d.get("test_metrics"))
    job.trained_tokens = int(d.get("trained_tokens") or 0)
    job_succeeded.send(sender=Job, job=job, model=model)
    meters.compression_to_ledger(
        organization_id=job.organization_id,
        job_id=job.pk,
        model=job.base_model_id,
        at=timezone.now(),
        engagement_id=job.engagement_id,
    )


def _test_scores(task: str, found: Any) -> dict[str, Any] | None:
    """The task's test metrics of a report (numbers, or None where one could not be
    measured) and "test_rows"; None when the job had no test data."""
    if not isinstance(found, dict):
        return None
    scores: dict[str, Any] = {}
    for name in (*TEST_METRICS.get(task, ()), "test_rows"):
        value = found.get(name)
        scores[name] = None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            scores[name] = int(value) if name == "test_rows" else float(value)
    return scores if scores.get("test_rows") else None


def source_test_metrics(job: Job) -> dict[str, Any] | None:
    """The source model's scores on the same test rows, measured in the same run."""
    if not job.test_metrics or not isinstance(job.report, dict):
        return None
    source = job.report.get("source")
    if not isinstance(source, dict):
        return None
    return {name: source.get(name) for name in TEST_METRICS.get(job.task, ())}


def held_out_out(job: Job) -> dict[str, Any]:
    """The held-out test fields of a compression job's API representation."""
    return {
        "test_file": job.test_file_id,
        "test_metrics": job.test_metrics,
        "source_test_metrics": source_test_metrics(job),
    }
