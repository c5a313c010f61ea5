from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from controlplane.accounts import apis as accounts
from controlplane.batches import apis as batches
from controlplane.billing import apis as billing
from controlplane.core import apis as core
from controlplane.core import health
from controlplane.core.metrics_views import metrics_view
from controlplane.datasets import apis as datasets
from controlplane.datasets import catalog_apis as catalog
from controlplane.engagements import apis as engagements
from controlplane.inference import deployment_apis as deployments
from controlplane.jobs import apis as jobs
from controlplane.modelregistry import apis as models
from controlplane.notifications import apis as webhooks
from controlplane.serving import schema as inference
from controlplane.tenancy import apis as tenancy

handler400 = "controlplane.core.errors.handler400"
handler403 = "controlplane.core.errors.handler403"
handler404 = "controlplane.core.errors.handler404"
handler500 = "controlplane.core.errors.handler500"

v1 = [
    path("v1/status", core.StatusApi.as_view(), name="status"),
    path("v1/schema", SpectacularAPIView.as_view(), name="schema"),
    path("v1/signup", accounts.SignupApi.as_view(), name="signup"),
    path("v1/me", accounts.MeApi.as_view(), name="me"),
    path("v1/invitations/accept", accounts.InvitationAcceptApi.as_view(), name="invitation-accept"),
    path("v1/organization", tenancy.OrganizationDetailApi.as_view(), name="organization"),
    path("v1/organization/members", tenancy.MemberListInviteApi.as_view(), name="members"),
    path(
        "v1/organization/members/<str:member_id>",
        tenancy.MemberDetailApi.as_view(),
        name="member-detail",
    ),
    path("v1/organization/invites", tenancy.InviteListApi.as_view(), name="invites"),
    path(
        "v1/organization/invites/<str:invite_id>",
        tenancy.InviteDetailApi.as_view(),
        name="invite-detail",
    ),
    path("v1/organization/api_keys", accounts.ApiKeyListCreateApi.as_view(), name="api-keys"),
    path(
        "v1/organization/api_keys/<str:key_id>",
        accounts.ApiKeyDetailApi.as_view(),
        name="api-key-detail",
    ),
    path(
        "v1/organization/api_keys/<str:key_id>/rotate",
        accounts.ApiKeyRotateApi.as_view(),
        name="api-key-rotate",
    ),
    path("v1/organization/audit_logs", tenancy.AuditLogListApi.as_view(), name="audit-logs"),
    path(
        "v1/organization/inference_usage",
        deployments.InferenceUsageListApi.as_view(),
        name="inference-usage",
    ),
    path("v1/batches", batches.BatchListCreateApi.as_view(), name="batches"),
    path("v1/batches/<str:batch_id>", batches.BatchDetailApi.as_view(), name="batch-detail"),
    path("v1/batches/<str:batch_id>/cancel", batches.BatchCancelApi.as_view(), name="batch-cancel"),
    path("v1/webhooks", webhooks.WebhookListCreateApi.as_view(), name="webhooks"),
    path(
        "v1/webhooks/<str:webhook_id>", webhooks.WebhookDetailApi.as_view(), name="webhook-detail"
    ),
    path(
        "v1/webhooks/<str:webhook_id>/rotate_secret",
        webhooks.WebhookRotateSecretApi.as_view(),
        name="webhook-rotate-secret",
    ),
    path(
        "v1/webhooks/<str:webhook_id>/deliveries",
        webhooks.WebhookDeliveryListApi.as_view(),
        name="webhook-deliveries",
    ),
    path("v1/files", datasets.FileListCreateApi.as_view(), name="files"),
    path("v1/files/<str:file_id>", datasets.FileDetailApi.as_view(), name="file-detail"),
    path("v1/files/<str:file_id>/content", datasets.FileContentApi.as_view(), name="file-content"),
    path("v1/files/<str:file_id>/validate", models.FileValidateApi.as_view(), name="file-validate"),
    path("v1/uploads", datasets.UploadCreateApi.as_view(), name="uploads"),
    path("v1/uploads/<str:upload_id>", datasets.UploadDetailApi.as_view(), name="upload-detail"),
    path("v1/uploads/<str:upload_id>/parts", datasets.UploadPartApi.as_view(), name="upload-parts"),
    path(
        "v1/uploads/<str:upload_id>/complete",
        datasets.UploadCompleteApi.as_view(),
        name="upload-complete",
    ),
    path(
        "v1/uploads/<str:upload_id>/cancel",
        datasets.UploadCancelApi.as_view(),
        name="upload-cancel",
    ),
    path("v1/datasets", datasets.DatasetListCreateApi.as_view(), name="datasets"),
    path(
        "v1/datasets/<str:dataset_id>", datasets.DatasetDetailApi.as_view(), name="dataset-detail"
    ),
    path(
        "v1/datasets/<str:dataset_id>/versions",
        datasets.DatasetVersionListCreateApi.as_view(),
        name="dataset-versions",
    ),
    path(
        "v1/datasets/<str:dataset_id>/versions/<str:version_id>",
        datasets.DatasetVersionDetailApi.as_view(),
        name="dataset-version-detail",
    ),
    path("v1/catalog", catalog.CatalogListPublishApi.as_view(), name="catalog"),
    path("v1/catalog/usage", catalog.CatalogUsageApi.as_view(), name="catalog-usage"),
    path("v1/catalog/earnings", billing.CatalogEarningsApi.as_view(), name="catalog-earnings"),
    path(
        "v1/catalog/access_requests",
        catalog.AccessRequestListApi.as_view(),
        name="catalog-access-requests",
    ),
    path(
        "v1/catalog/access_requests/<str:grant_id>",
        catalog.AccessRequestDetailApi.as_view(),
        name="catalog-access-request-detail",
    ),
    path(
        "v1/catalog/access_requests/<str:grant_id>/approve",
        catalog.AccessDecideApi.as_view(decision="approve"),
        name="catalog-access-approve",
    ),
    path(
        "v1/catalog/access_requests/<str:grant_id>/decline",
        catalog.AccessDecideApi.as_view(decision="decline"),
        name="catalog-access-decline",
    ),
    path("v1/catalog/<str:listing_id>", catalog.CatalogDetailApi.as_view(), name="catalog-detail"),
    path(
        "v1/catalog/<str:listing_id>/access_requests",
        catalog.CatalogAccessRequestApi.as_view(),
        name="catalog-access-request",
    ),
    path("v1/models", models.ModelListApi.as_view(), name="models"),
    # Model ids hold colons (`ft:base:org:suffix:job`): <path:> takes any id, and an
    # impossible one is the same 404 `model_not_found` as an unknown one.
    path("v1/models/<str:model_id>/card", models.ModelCardApi.as_view(), name="model-card"),
    path("v1/models/<path:model_id>", models.ModelDetailApi.as_view(), name="model-detail"),
    path("v1/fine_tuning/jobs", jobs.JobListCreateApi.as_view(), name="fine-tuning-jobs"),
    path(
        "v1/fine_tuning/jobs/<str:job_id>",
        jobs.JobDetailApi.as_view(),
        name="fine-tuning-job-detail",
    ),
    *(
        path(
            f"v1/fine_tuning/jobs/<str:job_id>/{action}",
            jobs.JobActionApi.as_view(action=action),
            name=f"fine-tuning-job-{action}",
        )
        for action in ("cancel", "pause", "resume")
    ),
    path(
        "v1/fine_tuning/jobs/<str:job_id>/events",
        jobs.JobEventListApi.as_view(),
        name="fine-tuning-job-events",
    ),
    path(
        "v1/fine_tuning/jobs/<str:job_id>/checkpoints",
        jobs.JobCheckpointListApi.as_view(),
        name="fine-tuning-job-checkpoints",
    ),
    path(
        "v1/compression/jobs", jobs.CompressionJobListCreateApi.as_view(), name="compression-jobs"
    ),
    path(
        "v1/compression/jobs/<str:job_id>",
        jobs.CompressionJobDetailApi.as_view(),
        name="compression-job-detail",
    ),
    path(
        "v1/compression/jobs/<str:job_id>/cancel",
        jobs.CompressionJobCancelApi.as_view(),
        name="compression-job-cancel",
    ),
    path(
        "v1/compression/jobs/<str:job_id>/events",
        jobs.CompressionJobEventListApi.as_view(),
        name="compression-job-events",
    ),
    path(
        "v1/compression/jobs/<str:job_id>/report",
        jobs.CompressionJobReportApi.as_view(),
        name="compression-job-report",
    ),
    path("v1/evaluations", jobs.EvaluationListCreateApi.as_view(), name="evaluations"),
    path(
        "v1/evaluations/<str:job_id>",
        jobs.EvaluationDetailApi.as_view(),
        name="evaluation-detail",
    ),
    path(
        "v1/evaluations/<str:job_id>/cancel",
        jobs.EvaluationCancelApi.as_view(),
        name="evaluation-cancel",
    ),
    path(
        "v1/evaluations/<str:job_id>/events",
        jobs.EvaluationEventListApi.as_view(),
        name="evaluation-events",
    ),
    path("v1/chat/completions", inference.ChatCompletionsApi.as_view(), name="chat-completions"),
    path("v1/completions", inference.CompletionsApi.as_view(), name="completions"),
    path("v1/embeddings", inference.EmbeddingsApi.as_view(), name="embeddings"),
    path("v1/classifications", inference.ClassificationsApi.as_view(), name="classifications"),
    path("v1/deployments", deployments.DeploymentListCreateApi.as_view(), name="deployments"),
    path(
        "v1/deployments/<str:deployment_id>",
        deployments.DeploymentDetailApi.as_view(),
        name="deployment-detail",
    ),
    path("v1/engagements", engagements.EngagementListApi.as_view(), name="engagements"),
    path(
        "v1/engagements/<str:engagement_id>",
        engagements.EngagementDetailApi.as_view(),
        name="engagement-detail",
    ),
    path("v1/", include("controlplane.billing.urls")),
    path("v1/", include("controlplane.payments.urls")),
    path("v1/", include("controlplane.limits.urls")),
    re_path(r"^v1/(?P<path>.*)$", core.unknown_url),
]

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    # Answered first by core.middleware.HealthProbeMiddleware (before host checks); internal
    # callers or the metrics token only, a 404 to anyone else (core.metrics_views).
    path("metrics", metrics_view, name="metrics"),
    path("docs", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("admin/", admin.site.urls),
    path("console/", include("controlplane.console.urls")),
    *v1,
]
