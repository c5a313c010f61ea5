"""Fine-tuning jobs (`/v1/fine_tuning/jobs`), OpenAI-compatible, with our extensions."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import unix, validated
from controlplane.tenancy.apis_base import OrganizationApi

from . import params, services
from .models import FineTuningJob, JobCheckpoint, JobEvent


def job_out(job: FineTuningJob) -> dict[str, Any]:
    hp = {k: job.hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    if job.method == "dpo":
        hp["beta"] = job.hyperparameters.get("beta")
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
    }


def event_out(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.pk,
        "object": "fine_tuning.job.event",
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
    scopes = {"read": "fine_tuning.read", "write": "fine_tuning.write"}

    def _job(self, job_id: str) -> FineTuningJob:
        return self.get_owned(FineTuningJob, job_id, label="fine-tuning job")


class JobListCreateApi(JobsApi):
    parser_classes = [JSONParser]

    @extend_schema(operation_id="list_fine_tuning_jobs", responses={200: dict})
    def get(self, request: Request) -> Response:
        queryset = FineTuningJob.objects.for_organization(self.organization).select_related(
            "base_model"
        )
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, job_out)

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
        return Response(job_out(self._job(job_id)))


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
        return Response(job_out(job))


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
