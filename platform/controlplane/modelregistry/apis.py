"""Models (`/v1/models`), in OpenAI's shapes with our fields added."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.audit.services import Actor
from controlplane.core.errors import ApiError
from controlplane.core.serializers import StrictInputSerializer, unix, validated
from controlplane.datasets.models import File
from controlplane.tenancy.apis_base import OrganizationApi
from controlplane.tenancy.roles import MANAGERS, Role

from . import cards, estimates, selectors, services, tokens
from .models import BaseModel, CustomerModel, EstimateStatus, FileEstimate

AUTO = "auto"


def model_out(model: BaseModel | CustomerModel) -> dict[str, Any]:
    """OpenAI's model object (`id, object, created, owned_by`) and what we know besides."""
    common = {"id": model.pk, "object": "model", "created": unix(model.created_at)}
    if isinstance(model, BaseModel):
        return {
            **common,
            "owned_by": model.owned_by,
            "kind": "base",
            "family": model.family,
            "context_length": model.context_length,
            "tasks": list(model.tasks),
            "methods": list(model.methods),
            "adapters": list(model.adapters),
            "price_per_1k_training_tokens": str(model.price_per_1k_training_tokens),
            "description": model.description,
            "base_model": None,
            "job_id": None,
            "suffix": None,
            "step": None,
            "version": None,
            "artifact_kind": None,
            "labels": None,
            "compression": None,
        }
    base = model.base
    return {
        **common,
        "owned_by": model.owned_by,
        "kind": model.kind,
        "family": base.family,
        "context_length": base.context_length,
        "tasks": [model.task],
        "methods": [],
        "adapters": [],
        "price_per_1k_training_tokens": None,
        "description": "",
        "base_model": base.pk,
        "job_id": model.job_id,
        "suffix": model.suffix or None,
        "step": model.step,
        "version": model.version,
        "artifact_kind": model.artifact_kind,
        "labels": list(model.labels),
        "compression": model.compression,
    }


class ModelsApi(OrganizationApi):
    scopes = {"read": "models.read", "write": "models.write"}


class ModelListApi(ModelsApi):
    """Base models every organization may fine-tune, and the caller's own fine-tuned models."""

    @extend_schema(responses={200: dict}, operation_id="list_models")
    def get(self, request: Request) -> Response:
        data = [model_out(m) for m in selectors.models_visible(self.organization)]
        return Response({"object": "list", "data": data})


class ModelDetailApi(ModelsApi):
    def _model(self, model_id: str) -> BaseModel | CustomerModel:
        return selectors.model_for_organization(organization=self.organization, model_id=model_id)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, model_id: str) -> Response:
        return Response(model_out(self._model(model_id)))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, model_id: str) -> Response:
        model = self._model(model_id)
        if isinstance(model, BaseModel):
            raise ApiError(
                f"'{model.pk}' is a base model provided by Atelier and cannot be deleted; "
                "only your own fine-tuned models can be.",
                status_code=403,
                code="cannot_delete_base_model",
            )
        # As in OpenAI: deleting a model takes the owner role. Service keys (no member)
        # are refused too: an admin could otherwise delete through one they made.
        if self.principal.role != Role.OWNER:
            raise ApiError(
                "Only organization owners can delete models: use a key of an owner.",
                status_code=403,
                code="insufficient_role",
            )
        services.customer_model_delete(organization=self.organization, model=model)
        return Response({"id": model.pk, "object": "model", "deleted": True})


# --- model cards (`/v1/models/{id}/card`) ------------------------------------------------------


class MarkdownCardRenderer(BaseRenderer):
    """`Accept: text/markdown`: the card as a Markdown document."""

    media_type = "text/markdown"
    format = "md"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        return cards.card_markdown(data).encode()


class ModelCardApi(ModelsApi):
    """A model's card: JSON by default, Markdown for `Accept: text/markdown`; its owners
    and admins set the intended use and limitations with PATCH."""

    renderer_classes = [JSONRenderer, MarkdownCardRenderer]

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "ModelCardUpdateRequest"

        intended_use = serializers.CharField(
            max_length=cards.CARD_TEXT_MAX, allow_blank=True, required=False
        )
        limitations = serializers.CharField(
            max_length=cards.CARD_TEXT_MAX, allow_blank=True, required=False
        )

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        # Errors are OpenAI-shaped JSON whatever the client accepts.
        if getattr(response, "exception", False):
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)

    def _model(self, model_id: str) -> BaseModel | CustomerModel:
        return selectors.model_for_organization(organization=self.organization, model_id=model_id)

    @extend_schema(responses={200: dict}, operation_id="retrieve_model_card")
    def get(self, request: Request, model_id: str) -> Response:
        return Response(cards.card_for(self._model(model_id)))

    @extend_schema(request=InputSerializer, responses={200: dict}, operation_id="update_model_card")
    def patch(self, request: Request, model_id: str) -> Response:
        model = self._model(model_id)
        data = validated(self.InputSerializer, request.data)
        if isinstance(model, BaseModel):
            raise ApiError(
                f"'{model.pk}' is a base model provided by Atelier: its card cannot be "
                "changed; set the card of one of your own fine-tuned models.",
                status_code=403,
                code="cannot_modify_base_model",
            )
        if self.principal.role not in MANAGERS:
            raise ApiError(
                "Only organization owners and admins can change a model card: use a key "
                "of an owner or an admin.",
                status_code=403,
                code="insufficient_role",
            )
        if not data:
            raise ApiError(
                "Send 'intended_use', 'limitations' or both.",
                code="invalid_request",
            )
        model = cards.customer_model_card_update(
            model=model, changes=data, actor=Actor.from_request(request)
        )
        return Response(cards.card_for(model))


# --- pre-job reports (`POST /v1/files/{id}/validate`) -----------------------------------------

#: What each training format trains: (task, method).
_FORMAT_TRAINS: dict[str, tuple[str, str]] = {
    "chat": ("causal_lm", "supervised"),
    "prompt_completion": ("causal_lm", "supervised"),
    "text": ("causal_lm", "supervised"),
    "preference": ("causal_lm", "dpo"),
    "classification": ("classification", "supervised"),
}


@extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["auto"]}]})
class EpochsField(serializers.Field):  # type: ignore[type-arg]
    """`"auto"` or a whole number of epochs, as in OpenAI's hyperparameters."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error_messages["null"] = self._message()

    @staticmethod
    def _message() -> str:
        return f'Must be "auto" or a whole number from 1 to {settings.JOBS_MAX_EPOCHS}.'

    def to_internal_value(self, data: Any) -> int | str:
        if data == AUTO:
            return AUTO
        # type() rather than isinstance(): True is an int, and 3.0 is not a count.
        if type(data) is not int or not 1 <= data <= settings.JOBS_MAX_EPOCHS:
            raise serializers.ValidationError(self._message())
        return data

    def to_representation(self, value: Any) -> Any:
        return value


def _warnings(base: BaseModel, format: str, report: dict[str, Any] | None) -> list[str]:
    out = []
    task, method = _FORMAT_TRAINS.get(format, (None, None))
    if task is not None and task not in base.tasks:
        out.append(
            f"{base.pk} does not train {task} (it supports {', '.join(base.tasks)}), which "
            f"{format} data is for: choose another base model."
        )
    elif method is not None and method not in base.methods:
        out.append(
            f"{base.pk} does not support {method} training (only {', '.join(base.methods)}), "
            f"which {format} data is for: choose another base model."
        )
    if report is None:
        return out
    counted, duplicates = report["tokens"], report["duplicates"]
    if counted["rows_over_context"]:
        out.append(
            f"{counted['rows_over_context']} rows are longer than {base.pk}'s context "
            f"({counted['context_length']} tokens): training truncates them."
        )
    if counted["rows_over_max_seq_len"]:
        out.append(
            f"{counted['rows_over_max_seq_len']} rows are longer than max_seq_len "
            f"({counted['max_seq_len']} tokens): training truncates them."
        )
    if duplicates["exact"] or duplicates["near"]:
        out.append(
            f"{duplicates['exact']} exact and {duplicates['near']} near-duplicate rows: a "
            "dataset version with dedupe_exact and dedupe_near drops them."
        )
    return out


def file_estimate_out(
    estimate: FileEstimate, *, file: File, n_epochs: int, auto: bool
) -> dict[str, Any]:
    validation = file.validation or {}
    format = str(validation.get("format"))
    report = estimate.result if estimate.status == EstimateStatus.COMPLETED else None
    price = None
    if report is not None:
        trained = int(report["tokens"]["trained_tokens"])
        price = {
            "currency": "usd",
            "price_per_1k_training_tokens": str(estimate.base.price_per_1k_training_tokens),
            "trained_tokens_per_epoch": trained,
            "n_epochs": n_epochs,
            "billable_tokens": trained * n_epochs,
            "amount": str(
                tokens.training_price(base=estimate.base, tokens=trained, n_epochs=n_epochs)
            ),
        }
    return {
        "object": "file.validation",
        "file_id": file.pk,
        "model": estimate.base_id,
        "status": estimate.status,
        "error": estimate.error or None,
        "format": format,
        "rows": validation.get("rows"),
        "n_epochs": n_epochs,
        "n_epochs_auto": auto,
        "max_seq_len": estimate.max_seq_len,
        "lengths": validation.get("lengths"),
        "label_counts": validation.get("label_counts"),
        "tokens": report["tokens"] if report else None,
        "duplicates": report["duplicates"] if report else None,
        "estimated_price": price,
        "warnings": _warnings(estimate.base, format, report),
        "created_at": unix(estimate.created_at),
        "finished_at": unix(estimate.finished_at),
    }


class FileValidateApi(OrganizationApi):
    """A training file's report for a base model before any job: tokens, duplicates, price.

    Small files are reported at once (200); larger ones are counted on the
    `control` queue: 202 with status `in_progress` until then, so POST again.
    """

    # Reading a file and pricing a job changes nothing of the caller's: read scope.
    scopes = {"write": "files.read"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "FileValidateRequest"

        model = serializers.CharField(max_length=300)
        n_epochs = EpochsField(required=False, default=tokens.DEFAULT_EPOCHS)
        max_seq_len = serializers.IntegerField(
            min_value=1, max_value=1 << 20, required=False, allow_null=True, default=None
        )

    @extend_schema(request=InputSerializer, responses={200: dict, 202: dict})
    def post(self, request: Request, file_id: str) -> Response:
        file = self.get_owned(File, file_id, label="file", deleted_at__isnull=True)
        data = validated(self.InputSerializer, request.data)
        model = selectors.model_for_organization(
            organization=self.organization, model_id=data["model"]
        )
        if isinstance(model, CustomerModel):
            raise ApiError(
                f"'{model.pk}' is a fine-tuned model; reports are made for base models "
                f"(use '{model.base_id}').",
                param="model",
                code="invalid_model",
            )
        max_seq_len = data["max_seq_len"]
        if max_seq_len is not None and max_seq_len > model.context_length:
            raise ApiError(
                f"max_seq_len may be at most {model.pk}'s context length "
                f"({model.context_length} tokens).",
                param="max_seq_len",
                code="invalid_value",
            )
        estimates.file_estimate_check(file)
        auto = data["n_epochs"] == AUTO
        rows = int((file.validation or {}).get("rows") or 0)
        n_epochs = tokens.auto_epochs(rows) if auto else int(data["n_epochs"])
        estimate = estimates.file_estimate_request(
            organization=self.organization, file=file, base=model, max_seq_len=max_seq_len
        )
        body = file_estimate_out(estimate, file=file, n_epochs=n_epochs, auto=auto)
        return Response(body, status=202 if estimate.status == EstimateStatus.IN_PROGRESS else 200)
