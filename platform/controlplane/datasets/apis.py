"""Files (`/v1/files`, OpenAI-compatible) and resumable uploads (`/v1/uploads`)."""

from __future__ import annotations

from typing import Any

from django.http import FileResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import ApiError
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, unix, validated
from controlplane.tenancy.apis_base import OrganizationApi

from . import services, storage
from .models import UPLOAD_PURPOSES, Dataset, DatasetVersion, File, Upload, UploadPart


def file_out(file: File) -> dict[str, Any]:
    return {
        "id": file.pk,
        "object": "file",
        "bytes": file.bytes,
        "created_at": unix(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": file.status_details or None,
        "expires_at": None,
        "sha256": file.sha256,
        "validation": file.validation,
    }


def upload_out(upload: Upload) -> dict[str, Any]:
    return {
        "id": upload.pk,
        "object": "upload",
        "bytes": upload.bytes,
        "created_at": unix(upload.created_at),
        "expires_at": unix(upload.expires_at),
        "filename": upload.filename,
        "purpose": upload.purpose,
        "status": upload.current_status(),
        "file": file_out(upload.file) if upload.file else None,
    }


def part_out(part: UploadPart) -> dict[str, Any]:
    return {
        "id": part.pk,
        "object": "upload.part",
        "created_at": unix(part.created_at),
        "upload_id": part.upload_id,
        "bytes": part.bytes,
        "sha256": part.sha256,
    }


def _multipart_file(request: Request, field: str) -> Any:
    if not hasattr(request.data, "getlist"):
        raise ApiError("Send multipart/form-data.", code="invalid_content_type")
    files = request.FILES.getlist(field)
    if len(files) != 1:
        raise ApiError(f"Send exactly one '{field}' file part.", param=field)
    return files[0]


def _multipart_text(request: Request, field: str) -> str:
    values = request.data.getlist(field) if hasattr(request.data, "getlist") else []
    if len(values) != 1 or not isinstance(values[0], str):
        raise ApiError(f"Send exactly one '{field}' form field.", param=field)
    return str(values[0])


class FilesApi(OrganizationApi):
    scopes = {"read": "files.read", "write": "files.write"}


class FileListCreateApi(FilesApi):
    parser_classes = [MultiPartParser]

    @extend_schema(responses={200: dict}, operation_id="list_files")
    def get(self, request: Request) -> Response:
        queryset = File.objects.for_organization(self.organization).filter(deleted_at__isnull=True)
        purpose = request.query_params.get("purpose")
        if purpose:
            queryset = queryset.filter(purpose=services.purpose_check(purpose, upload=False))
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, file_out)

    @extend_schema(
        request={
            "multipart/form-data": inline_serializer(
                "FileUploadRequest",
                {
                    "file": serializers.FileField(),
                    "purpose": serializers.ChoiceField(UPLOAD_PURPOSES),
                },
            )
        },
        responses={200: dict},
    )
    def post(self, request: Request) -> Response:
        upload = _multipart_file(request, "file")
        purpose = _multipart_text(request, "purpose")
        extra = set(request.data) - {"file", "purpose"}
        if extra:
            raise ApiError(f"Unknown field: {sorted(extra)[0]}.", param=sorted(extra)[0])
        file = services.file_create(
            organization=self.organization,
            user_id=self.principal.user.pk if self.principal.user else None,
            source=upload.file if hasattr(upload, "file") else upload,
            size=upload.size,
            filename=upload.name or "",
            purpose=purpose,
        )
        return Response(file_out(file), status=200)


class FileDetailApi(FilesApi):
    def _file(self, file_id: str) -> File:
        return self.get_owned(File, file_id, label="file", deleted_at__isnull=True)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, file_id: str) -> Response:
        return Response(file_out(self._file(file_id)))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, file_id: str) -> Response:
        file = self._file(file_id)
        services.file_delete(file=file)
        return Response({"id": file.pk, "object": "file", "deleted": True})


class _AnyMediaType(JSONRenderer):
    """Lets clients that ask for bytes (the SDKs send `Accept: application/binary`)
    through content negotiation; errors are still rendered as JSON."""

    media_type = "*/*"
    format = "binary"


class FileContentApi(FileDetailApi):
    renderer_classes = [JSONRenderer, _AnyMediaType]

    @extend_schema(responses={200: bytes})
    def get(self, request: Request, file_id: str) -> FileResponse:  # type: ignore[override]
        file = self._file(file_id)
        response = FileResponse(
            storage.open_object(file.storage_name), content_type="application/octet-stream"
        )
        response["Content-Length"] = str(file.bytes)
        return response


class UploadCreateApi(FilesApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "UploadCreateRequest"

        filename = serializers.CharField(max_length=1000, trim_whitespace=False)
        purpose = serializers.ChoiceField(choices=UPLOAD_PURPOSES)
        bytes = serializers.IntegerField(min_value=1)
        mime_type = serializers.CharField(max_length=100, required=False, default="")
        sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False, default="")

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        upload = services.upload_create(
            organization=self.organization,
            user_id=self.principal.user.pk if self.principal.user else None,
            filename=data["filename"],
            purpose=data["purpose"],
            nbytes=data["bytes"],
            mime_type=data["mime_type"],
            sha256=data["sha256"],
        )
        return Response(upload_out(upload))


class UploadDetailApi(FilesApi):
    """Our extension: an upload with the parts received so far, to resume after a drop."""

    @extend_schema(responses={200: dict})
    def get(self, request: Request, upload_id: str) -> Response:
        upload = self.get_owned(Upload, upload_id, label="upload")
        body = upload_out(upload)
        body["parts"] = [part_out(p) for p in upload.parts.order_by("pk")]
        return Response(body)


class UploadPartApi(FilesApi):
    parser_classes = [MultiPartParser]

    @extend_schema(
        request={
            "multipart/form-data": inline_serializer(
                "UploadPartRequest", {"data": serializers.FileField()}
            )
        },
        responses={200: dict},
    )
    def post(self, request: Request, upload_id: str) -> Response:
        upload = self.get_owned(Upload, upload_id, label="upload")
        data = _multipart_file(request, "data")
        part = services.upload_add_part(
            upload=upload, source=data.file if hasattr(data, "file") else data, size=data.size
        )
        return Response(part_out(part))


class UploadCompleteApi(FilesApi):
    parser_classes = [JSONParser]

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "UploadCompleteRequest"

        part_ids = serializers.ListField(
            child=serializers.CharField(max_length=40), min_length=1, max_length=10000
        )
        md5 = serializers.RegexField(r"^[0-9a-fA-F]{32}$", required=False)
        sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False)

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request: Request, upload_id: str) -> Response:
        upload = self.get_owned(Upload, upload_id, label="upload")
        data = validated(self.InputSerializer, request.data)
        upload = services.upload_complete(
            upload=upload, part_ids=data["part_ids"], md5=data.get("md5"), sha256=data.get("sha256")
        )
        return Response(upload_out(upload))


class UploadCancelApi(FilesApi):
    @extend_schema(request=None, responses={200: dict})
    def post(self, request: Request, upload_id: str) -> Response:
        upload = self.get_owned(Upload, upload_id, label="upload")
        return Response(upload_out(services.upload_cancel(upload=upload)))


# --- datasets and versions (`/v1/datasets`) ---------------------------------------------------


def dataset_out(dataset: Dataset) -> dict[str, Any]:
    latest = dataset.versions.order_by("-number").first()
    return {
        "id": dataset.pk,
        "object": "dataset",
        "name": dataset.name,
        "description": dataset.description,
        "created_at": unix(dataset.created_at),
        "latest_version": version_out(latest) if latest else None,
    }


def version_out(version: DatasetVersion) -> dict[str, Any]:
    return {
        "id": version.pk,
        "object": "dataset.version",
        "dataset_id": version.dataset_id,
        "number": version.number,
        "status": version.status,
        "status_details": version.status_details or None,
        "format": version.format,
        "source_files": version.source_files,
        "recipe": version.recipe,
        "bytes": version.bytes,
        "rows": version.rows,
        "sha256": version.sha256 or None,
        "report": version.report,
        "created_at": unix(version.created_at),
    }


class DatasetListCreateApi(FilesApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "DatasetCreateRequest"

        name = serializers.CharField(max_length=200)
        description = serializers.CharField(
            max_length=5000, required=False, default="", allow_blank=True
        )

    @extend_schema(responses={200: dict}, operation_id="list_datasets")
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(Dataset.objects.for_organization(self.organization), request)
        return list_response(rows, has_more, dataset_out)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        dataset = services.dataset_create(
            organization=self.organization, name=data["name"], description=data["description"]
        )
        return Response(dataset_out(dataset), status=201)


class DatasetDetailApi(FilesApi):
    @extend_schema(responses={200: dict})
    def get(self, request: Request, dataset_id: str) -> Response:
        return Response(dataset_out(self.get_owned(Dataset, dataset_id, label="dataset")))


class DatasetVersionListCreateApi(FilesApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "DatasetVersionCreateRequest"

        file_ids = serializers.ListField(
            child=serializers.CharField(max_length=40), min_length=1, max_length=100
        )
        recipe = serializers.DictField(required=False, default=dict)

    @extend_schema(responses={200: dict}, operation_id="list_dataset_versions")
    def get(self, request: Request, dataset_id: str) -> Response:
        dataset = self.get_owned(Dataset, dataset_id, label="dataset")
        rows, has_more = paginate(dataset.versions.all(), request)
        return list_response(rows, has_more, version_out)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request: Request, dataset_id: str) -> Response:
        dataset = self.get_owned(Dataset, dataset_id, label="dataset")
        data = validated(self.InputSerializer, request.data)
        version = services.version_create(
            dataset=dataset, file_ids=data["file_ids"], recipe=data["recipe"]
        )
        return Response(version_out(version), status=201)


class DatasetVersionDetailApi(FilesApi):
    @extend_schema(responses={200: dict})
    def get(self, request: Request, dataset_id: str, version_id: str) -> Response:
        dataset = self.get_owned(Dataset, dataset_id, label="dataset")
        version = self.get_owned(
            DatasetVersion, version_id, label="dataset version", dataset=dataset
        )
        return Response(version_out(version))
