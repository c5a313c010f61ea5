"""One `job.transition` log line each time a job's status changes, whichever code
changed it (services, dispatch, reports, the reaper, the admin): every transition saves
the job, so a `post_init`/`post_save` pair sees them all in one place. Logged once the
transaction commits: a rolled-back change never happened."""

from __future__ import annotations

from typing import Any

import structlog
from django.db import transaction
from django.db.models.signals import post_init, post_save

from .models import Job
from .signals import job_transitioned

log = structlog.get_logger("controlplane.jobs")

#: The status a job had when it was loaded or last saved (an instance attribute).
_SEEN = "_logged_status"


def _loaded(sender: type[Job], instance: Job, **_: Any) -> None:
    # Not `instance.status`: a deferred field (`.only(...)`) would cost a query here.
    setattr(instance, _SEEN, instance.__dict__.get("status"))


def _saved(sender: type[Job], instance: Job, created: bool, **_: Any) -> None:
    before = getattr(instance, _SEEN, None)
    after = instance.__dict__.get("status")
    setattr(instance, _SEEN, after)
    if after is None or (before == after and not created):
        return
    fields = {
        "job_id": instance.pk,
        "kind": instance.__dict__.get("kind"),
        "from": None if created else before,
        "to": after,
        "organization_id": instance.__dict__.get("organization_id"),
        "attempt": instance.__dict__.get("attempt"),
    }
    transaction.on_commit(lambda: log.info("job.transition", **fields))
    job_transitioned.send(sender=Job, job=instance, before=fields["from"], after=after)


def connect() -> None:
    post_init.connect(_loaded, sender=Job, dispatch_uid="jobs.transitions.loaded")
    post_save.connect(_saved, sender=Job, dispatch_uid="jobs.transitions.saved")
