"""Mark the plan periods that live Stripe subscriptions already charge (billing 0003 added
PlanAssignment.billed_by, defaulting to `invoice`): without this, organizations subscribed
before the change would have their plan fee charged again on the next monthly invoice.
"""

from typing import Any

from django.db import migrations

GRANTING = ("active", "trialing", "past_due")


def backfill(apps: Any, schema_editor: Any) -> None:
    # Historical models lack the scoped `objects` managers: the base manager reads all rows.
    Subscription = apps.get_model("payments", "Subscription")
    PlanAssignment = apps.get_model("billing", "PlanAssignment")
    Organization = apps.get_model("tenancy", "Organization")
    for sub in Subscription._base_manager.filter(status__in=GRANTING).exclude(plan=""):
        org = Organization._base_manager.get(pk=sub.organization_id)
        if org.plan != sub.plan:
            continue
        latest = (
            PlanAssignment._base_manager.filter(organization_id=org.pk)
            .order_by("effective_from", "created_at")
            .last()
        )
        if latest is not None and latest.plan_id == sub.plan:
            PlanAssignment._base_manager.filter(pk=latest.pk).update(billed_by="subscription")


class Migration(migrations.Migration):
    dependencies = [
        ("payments", "0001_initial"),
        ("billing", "0003_plan_billed_by"),
    ]

    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
