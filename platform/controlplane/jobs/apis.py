"""Fine-tuning jobs (`/v1/fine_tuning/jobs`), OpenAI-compatible, with our extensions, and
compression jobs (`/v1/compression/jobs`) and evaluations (`/v1/evaluations`): the same
views over the other kinds of job."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import Conflict
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import unix, validated
from controlplane.tenancy.apis_base import OrganizationApi

from . import compression, evaluation, params, services
from .models import Job, JobCheckpoint, JobEvent, JobKind


def job_out(job: Job) -> dict[str, Any]:
    hp = {k: job.hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    if job.method == "dpo":
        hp["beta"] = job.hyperparameters.get("beta")
    if job.hyperparameters.get("test_fraction") is not None:
        hp["test_fraction"] = job.hyperparameters["test_fraction"]
    if job.kind == JobKind.FINE_TUNING:
        hp["group_by_length"] = bool(job.hyperparameters.get("group_by_length", True))
        hp["packing"] = bool(job.hyperparameters.get("packing", False))
    estimate = None
    if job.estimated_tokens is not None:
        estimate = {
            "training_tokens_per_epoch": job.estimated_tokens,
            "n_epochs": job.hyperparameters["n_epochs"],
            "total_training_tokens": job.estimated_tokens * int(job.hyperparameters["n_epochs"]),
            "price": str(job.estimated_price),
            "price_per_1k_training_tokens": str(job.base_model.price_per_1k_training_tokens),
        }
    return {
        "id": job.pk,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model or None,
        "finished_at": unix(job.finished_at),
        "hyperparameters": hp,
        "model": job.base_model_id,
        "organization_id": job.organization_id,
        "result_files": [],
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file_id,
        "validation_file": job.validation_file_id,
        "integrations": [],
        "metadata": job.metadata or None,
        "method": {"type": job.method, job.method: {"hyperparameters": hp}},
        "user_provided_suffix": job.suffix or None,
        "estimated_finish": None,
        # Our extensions.
        "dataset": job.dataset_version_id,
        "task": job.task,
        "adapter": job.adapter if job.adapter is not None else {"type": "full"},
        "labels": job.labels or None,
        "gpus": job.gpus,
        "learning_rate": job.hyperparameters.get("learning_rate"),
        "estimate": estimate,
        "progress": {"step": job.current_step, "total_steps": job.total_steps},
        "attempt": job.attempt,
        # Held-out evaluation: the final model on the validation and the test set.
        "test_file": job.test_file_id,
        "validation_metrics": job.validation_metrics,
        "test_metrics": job.test_metrics,
    }


def compression_job_out(job: Job) -> dict[str, Any]:
    return {
        "id": job.pk,
        "object": "compression.job",
        "created_at": unix(job.created_at),
        "model": job.source_model_id or job.base_model_id,
        "method": job.method,
        "options": job.hyperparameters,
        "task": job.task,
        "status": job.status,
        "error": job.error,
        "compressed_model": job.fine_tuned_model or None,
        "training_file": job.training_file_id,
        "dataset": job.dataset_version_id,
        "validation_file": job.validation_file_id,
        "user_provided_suffix": job.suffix or None,
        "seed": job.seed,
        "metadata": job.metadata or None,
        "organization_id": job.organization_id,
        "estimate": {
            "price": None if job.estimated_price is None else str(job.estimated_price),
            "seconds": job.estimated_seconds,
        },
        "estimated_finish": (
            int(job.started_at.timestamp()) + job.estimated_seconds
            if job.started_at is not None and job.estimated_seconds is not None
            else None
        ),
        "started_at": unix(job.started_at),
        "finished_at": unix(job.finished_at),
        "progress": {"step": job.current_step, "total_steps": job.total_steps},
        "attempt": job.attempt,
        "report_available": job.report is not None,
        # Held-out evaluation: the result and its source on the test set.
        **compression.held_out_out(job),
    }


def event_out(event: JobEvent) -> dict[str, Any]:
    object_name = (
        "compression.job.event"
        if event.job_id.startswith("cmpjob-")
        else "evaluation.event"
        if event.job_id.startswith("evaljob-")
        else "fine_tuning.job.event"
    )
    return {
        "id": event.pk,
        "object": object_name,
        "created_at": unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


def checkpoint_out(checkpoint: JobCheckpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.pk,
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": checkpoint.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": {"step": checkpoint.step_number, **checkpoint.metrics},
        "step_number": checkpoint.step_number,
    }


class JobsApi(OrganizationApi):
    """Jobs of one kind: a job of the other kind is as unknown here as a foreign one."""

    scopes = {"read": "fine_tuning.read", "write": "fine_tuning.write"}
    kind = JobKind.FINE_TUNING
    label = "fine-tuning job"

    def _job(self, job_id: str) -> Job:
        # A custom engagement's job is run by staff for the customer: not theirs to see.
        return self.get_owned(
            Job, job_id, label=self.label, kind=self.kind, engagement_id__isnull=True
        )

    def out(self, job: Job) -> dict[str, Any]:
        return job_out(job)


class JobListCreateApi(JobsApi):
    parser_classes = [JSONParser]

    @extend_schema(operation_id="list_fine_tuning_jobs", responses={200: dict})
    def get(self, request: Request) -> Response:
        queryset = (
            Job.objects.for_organization(self.organization)
            .filter(kind=self.kind, engagement_id__isnull=True)
            .select_related("base_model")
        )
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, self.out)

    @extend_schema(request=params.CreateJobInput, responses={200: dict})
    def post(self, request: Request) -> Response:
        data = validated(params.CreateJobInput, request.data)
        job = services.job_create(
            organization=self.organization,
            user_id=self.principal.user.pk if self.principal.user else None,
            data=data,
        )
        return Response(job_out(job))


class JobDetailApi(JobsApi):
    @extend_schema(responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        return Response(self.out(self._job(job_id)))


class JobActionApi(JobsApi):
    """POST …/{id}/cancel | pause | resume."""

    action = ""
    actions = {
        "cancel": services.job_cancel,
        "pause": services.job_pause,
        "resume": services.job_resume,
    }

    @extend_schema(request=None, responses={200: dict})
    def post(self, request: Request, job_id: str) -> Response:
        job = self.actions[self.action](job=self._job(job_id))
        return Response(self.out(job))


class JobEventListApi(JobsApi):
    @extend_schema(responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        job = self._job(job_id)
        queryset = JobEvent.objects.for_organization(self.organization).filter(job=job)
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, event_out)


class JobCheckpointListApi(JobsApi):
    @extend_schema(responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        job = self._job(job_id)
        queryset = JobCheckpoint.objects.for_organization(self.organization).filter(job=job)
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, checkpoint_out)


# --- compression jobs ---------------------------------------------------------------------


class CompressionJobsApi(JobsApi):
    kind = JobKind.COMPRESSION
    label = "compression job"

    def out(self, job: Job) -> dict[str, Any]:
        return compression_job_out(job)


class CompressionJobListCreateApi(CompressionJobsApi, JobListCreateApi):
    @extend_schema(operation_id="list_compression_jobs", responses={200: dict})
    def get(self, request: Request) -> Response:
        return super().get(request)

    @extend_schema(
        operation_id="create_compression_job",
        request=compression.CreateCompressionJobInput,
        responses={200: dict},
    )
    def post(self, request: Request) -> Response:
        data = validated(compression.CreateCompressionJobInput, request.data)
        job = services.compression_job_create(
            organization=self.organization,
            user_id=self.principal.user.pk if self.principal.user else None,
            data=data,
        )
        return Response(self.out(job))


class CompressionJobDetailApi(CompressionJobsApi, JobDetailApi):
    @extend_schema(operation_id="retrieve_compression_job", responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        return super().get(request, job_id)


class CompressionJobCancelApi(CompressionJobsApi, JobActionApi):
    """A compression job has no checkpoints to pause at: it can only be cancelled."""

    action = "cancel"

    @extend_schema(operation_id="cancel_compression_job", request=None, responses={200: dict})
    def post(self, request: Request, job_id: str) -> Response:
        return super().post(request, job_id)


class CompressionJobEventListApi(CompressionJobsApi, JobEventListApi):
    @extend_schema(operation_id="list_compression_job_events", responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        return super().get(request, job_id)


class CompressionJobReportApi(CompressionJobsApi):
    @extend_schema(operation_id="retrieve_compression_job_report", responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        job = self._job(job_id)
        if job.report is None:
            raise Conflict(
                f"Job '{job.pk}' is {job.status}: its report is written when it succeeds.",
                code="report_not_ready",
            )
        return Response(
            {
                "object": "compression.job.report",
                "job_id": job.pk,
                "model": job.fine_tuned_model,
                **job.report,
            }
        )


# --- evaluations --------------------------------------------------------------------------


class EvaluationsApi(JobsApi):
    kind = JobKind.EVALUATION
    label = "evaluation"

    def out(self, job: Job) -> dict[str, Any]:
        return evaluation.evaluation_out(job)


class EvaluationListCreateApi(EvaluationsApi, JobListCreateApi):
    @extend_schema(operation_id="list_evaluations", responses={200: dict})
    def get(self, request: Request) -> Response:
        return super().get(request)

    @extend_schema(
        operation_id="create_evaluation",
        request=evaluation.CreateEvaluationInput,
        responses={200: dict},
    )
    def post(self, request: Request) -> Response:
        data = validated(evaluation.CreateEvaluationInput, request.data)
        job = services.evaluation_job_create(
            organization=self.organization,
            user_id=self.principal.user.pk if self.principal.user else None,
            data=data,
        )
        return Response(self.out(job))


class EvaluationDetailApi(EvaluationsApi, JobDetailApi):
    @extend_schema(operation_id="retrieve_evaluation", responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        return super().get(request, job_id)


class EvaluationCancelApi(EvaluationsApi, JobActionApi):
    action = "cancel"

    @extend_schema(operation_id="cancel_evaluation", request=None, responses={200: dict})
    def post(self, request: Request, job_id: str) -> Response:
        return super().post(request, job_id)


class EvaluationEventListApi(EvaluationsApi, JobEventListApi):
    @extend_schema(operation_id="list_evaluation_events", responses={200: dict})
    def get(self, request: Request, job_id: str) -> Response:
        return super().get(request, job_id)
