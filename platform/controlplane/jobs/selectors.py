"""Reading jobs for staff: loss curves, a compression report as before/after bars, the live
status the admin polls, and which broker queue a job runs on."""

from __future__ import annotations

import math
from typing import Any

from django.db.models import F
from django.db.models.fields.json import KT

from controlplane.core.charts import BarGroup, Series, number
from controlplane.core.serializers import unix
from jobcontracts import queues

from .models import Job, JobCheckpoint, JobEvent, JobKind

#: The broker queue a job of each kind is sent to (dispatch._send).
QUEUE_OF_KIND = {
    JobKind.FINE_TUNING: queues.GPU_TRAINING,
    JobKind.COMPRESSION: queues.GPU_COMPRESSION,
    JobKind.EVALUATION: queues.GPU_TRAINING,
}
#: The most points a curve is drawn with: a long job is thinned to about this many.
MAX_CURVE_POINTS = 800
#: The newest events the status poll returns.
STATUS_EVENTS = 20


def queue_of(job: Job) -> str:
    return QUEUE_OF_KIND[JobKind(job.kind)]


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _thin(points: dict[int, float]) -> list[tuple[float, float | None]]:
    steps = sorted(points)
    if len(steps) > MAX_CURVE_POINTS:
        stride = math.ceil(len(steps) / MAX_CURVE_POINTS)
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    return [(float(step), points[step]) for step in steps]


def loss_curves(job: Job) -> list[Series]:
    """Training and validation loss by step, from the job's metric events (the worker's
    progress and evaluation reports) and, for steps they lack, its checkpoints' metrics.
    A step reported by several attempts (a resumed job redoes the steps after its last
    checkpoint) is drawn at the latest attempt's value."""
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    rows = (
        JobEvent.objects.for_organization(job.organization_id)
        .filter(job=job, type="metrics")
        .order_by(F("attempt").asc(nulls_first=True), F("seq").asc(nulls_first=True), "id")
        .values_list(KT("data__step"), KT("data__train_loss"), KT("data__valid_loss"))
    )
    for step_text, train_loss, valid_loss in rows:
        step = _number(step_text)
        if step is None:
            continue
        for curve, value in ((train, train_loss), (valid, valid_loss)):
            if value is not None:
                loss = _number(value)
                curve[int(step)] = loss if loss is not None else math.nan
    checkpoints = (
        JobCheckpoint.objects.for_organization(job.organization_id)
        .filter(job=job)
        .values_list("step_number", "metrics")
    )
    for step, metrics in checkpoints:
        for curve, name in ((train, "train_loss"), (valid, "valid_loss")):
            loss = _number((metrics or {}).get(name))
            if loss is not None:
                curve.setdefault(int(step), loss)
    return [Series("Training loss", _thin(train)), Series("Validation loss", _thin(valid))]


def _bytes(value: float) -> str:
    for limit, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(value) >= limit:
            return f"{value / limit:.3g} {unit}"
    return f"{value:.0f} B"


def _ms(value: float) -> str:
    return f"{value:.3g} ms"


#: (label, key in a report's Measures, how a raw value reads).
_REPORT_METRICS: tuple[tuple[str, str, Any], ...] = (
    ("Parameters", "parameters", number),
    ("File size", "file_bytes", _bytes),
    ("Peak memory", "peak_memory_bytes", _bytes),
    ("Latency p50 b1", "latency_ms_p50_batch1", _ms),
    ("Latency p50 b16", "latency_ms_p50_batch16", _ms),
    ("Quality", "quality", lambda v: f"{v:.4g}"),
)


def report_groups(report: dict[str, Any]) -> list[BarGroup]:
    """A compression report's source and result measures, one bar group per metric."""
    source = report.get("source") or {}
    result = report.get("result") or {}
    groups = []
    for label, key, show in _REPORT_METRICS:
        values = [_number(source.get(key)), _number(result.get(key))]
        if key == "quality" and report.get("quality_metric"):
            label = f"{label} ({report['quality_metric']})"
        groups.append(
            BarGroup(
                label=label,
                values=values,
                display=[show(v) if v is not None else "n/a" for v in values],
            )
        )
    return groups


def event_brief(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.pk,
        "created_at": unix(event.created_at),
        "level": event.level,
        "type": event.type,
        "message": event.message,
    }


def job_status(job: Job) -> dict[str, Any]:
    """What the admin's job page polls: status, progress and the newest events."""
    events = (
        JobEvent.objects.for_organization(job.organization_id)
        .filter(job=job)
        .order_by("-created_at", "-id")[:STATUS_EVENTS]
    )
    return {
        "id": job.pk,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "current_step": job.current_step,
        "total_steps": job.total_steps,
        "attempt": job.attempt,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model or None,
        "finished_at": unix(job.finished_at),
        "events": [event_brief(e) for e in events],
    }
