"""Budgets against the real Redis and PostgreSQL: reserve, settle, periods, rebuild, alerts."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core import mail

from controlplane.audit.models import AuditLog
from controlplane.billing.models import LedgerEntry, Meter, PriceBookEntry
from controlplane.core.redis_clients import sync_client
from controlplane.limits import budgets
from controlplane.limits.budgets import (
    InsufficientQuota,
    areserve,
    asettle,
    budget_state,
    period_bounds,
)
from controlplane.limits.models import Budget, BudgetAlert
from controlplane.limits.services import budget_create
from controlplane.limits.spend import ledger_spend
from tests.support.budgets import reserve, settle
from tests.support.people import SYSTEM, Person, join

pytestmark = pytest.mark.django_db

D = Decimal


def _budget(person: Person, amount: str, **kwargs: object) -> Budget:
    fields: dict[str, object] = {
        "api_key": None,
        "name": "",
        "kind": "hard",
        "period": "month",
        "period_days": None,
        "anchor": None,
        "alert_thresholds": [],
    }
    fields.update(kwargs)
    return budget_create(
        organization=person.organization,
        amount=D(amount),
        actor=SYSTEM,
        **fields,  # type: ignore[arg-type]
    )


def _spend(
    person: Person, amount: str, *, key: str | None = None, at: datetime | None = None
) -> None:
    r = reserve(organization_id=person.organization.pk, api_key_id=key, max_cost=D(amount), at=at)
    settle(r, D(amount))


def _reserve(person: Person, cost: str, *, key: str | None = None, at: datetime | None = None):  # type: ignore[no-untyped-def]
    return reserve(organization_id=person.organization.pk, api_key_id=key, max_cost=D(cost), at=at)


# --- periods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        (datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC), datetime(2025, 1, 1), datetime(2025, 2, 1)),
        (datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 2, 1), datetime(2025, 3, 1)),
        (datetime(2024, 2, 29, 12, tzinfo=UTC), datetime(2024, 2, 1), datetime(2024, 3, 1)),
        (datetime(2025, 12, 31, 23, tzinfo=UTC), datetime(2025, 12, 1), datetime(2026, 1, 1)),
    ],
)
def test_calendar_month_periods_are_utc_months(
    at: datetime, start: datetime, end: datetime
) -> None:
    got = period_bounds(period="month", period_days=None, anchor=at, at=at)
    assert got == (start.replace(tzinfo=UTC), end.replace(tzinfo=UTC))


def test_day_periods_run_every_n_days_from_the_anchor() -> None:
    anchor = datetime(2025, 3, 10, 8, tzinfo=UTC)
    week = timedelta(days=7)
    assert period_bounds(period="days", period_days=7, anchor=anchor, at=anchor) == (
        anchor,
        anchor + week,
    )
    later = anchor + 2 * week + timedelta(hours=3)
    assert period_bounds(period="days", period_days=7, anchor=anchor, at=later) == (
        anchor + 2 * week,
        anchor + 3 * week,
    )
    before = anchor - timedelta(seconds=1)
    assert period_bounds(period="days", period_days=7, anchor=anchor, at=before) == (
        anchor - week,
        anchor,
    )


# --- reserve and settle ------------------------------------------------------------------


def test_a_hard_budget_refuses_with_insufficient_quota_naming_it_and_its_reset(
    alice: Person,
) -> None:
    budget = _budget(alice, "1.00", name="prod cap")
    _spend(alice, "0.60")
    _spend(alice, "0.40")
    with pytest.raises(InsufficientQuota) as refused:
        _reserve(alice, "0.01")
    error = refused.value
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    message = str(error.detail)
    assert budget.pk in message
    assert "hard budget 'prod cap'" in message
    assert "$1.00 spent" in message
    now = datetime.now(UTC)
    resets = period_bounds(period="month", period_days=None, anchor=now, at=now)[1]
    assert f"resets at {resets:%Y-%m-%dT%H:%M:%SZ}" in message
    assert error.retry_after >= 1


def test_reservations_in_flight_count_against_a_hard_budget(alice: Person) -> None:
    _budget(alice, "1.00")
    held = _reserve(alice, "0.70")
    _reserve(alice, "0.20")  # 0.90 held: still under
    _reserve(alice, "0.50")  # 0.90 < 1.00 at admission: admitted, overshoot ≤ its cost
    with pytest.raises(InsufficientQuota) as refused:
        _reserve(alice, "0.01")
    assert "held by requests in flight" in str(refused.value.detail)
    settle(held, D("0"))  # the big one failed and cost nothing: its hold goes
    _reserve(alice, "0.01")


def test_settle_is_idempotent(alice: Person) -> None:
    budget = _budget(alice, "10")
    r = _reserve(alice, "2")
    settle(r, D("1.5"))
    settle(r, D("1.5"))
    state = budget_state(budgets.BudgetSpec.of(budget))
    assert (state.spent, state.reserved) == (D("1.5"), D(0))


def test_a_soft_budget_never_refuses(alice: Person) -> None:
    _budget(alice, "1", kind="soft")
    for _ in range(3):
        _spend(alice, "0.75")


def test_a_key_budget_binds_only_that_key_and_the_org_budget_binds_all(
    alice: Person, bob: Person
) -> None:
    alice_key = alice.membership.api_keys.get().pk
    bob_key = bob.membership.api_keys.get().pk
    _budget(alice, "1", api_key=alice.membership.api_keys.get())
    _budget(alice, "3")
    _spend(alice, "1", key=alice_key)
    with pytest.raises(InsufficientQuota) as refused:
        _reserve(alice, "0.1", key=alice_key)
    assert f"API key {alice_key}'s hard budget" in str(refused.value.detail)
    _spend(alice, "2", key=bob_key)  # bob is under no key budget: only the org's
    with pytest.raises(InsufficientQuota) as refused:
        _reserve(alice, "0.1", key=bob_key)
    assert "the organization's hard budget" in str(refused.value.detail)


def test_no_budget_means_no_refusal_and_no_redis(alice: Person) -> None:
    r = _reserve(alice, "1000")
    assert r.held == ()
    settle(r, D("1000"))


def test_an_unsettled_reservation_expires_and_a_late_settle_still_counts(
    alice: Person, settings: object
) -> None:
    settings.LIMITS_RESERVATION_TTL_SECONDS = 0.2  # type: ignore[attr-defined]
    budget = _budget(alice, "1")
    crashed = _reserve(alice, "0.9")
    slow = _reserve(alice, "0.2")
    with pytest.raises(InsufficientQuota):
        _reserve(alice, "0.2")
    time.sleep(0.3)
    fresh = _reserve(alice, "0.5")  # the holds of both unsettled requests were released
    state = budget_state(budgets.BudgetSpec.of(budget))
    assert state.reserved == D("0.5")
    settle(crashed, D("0.3"))  # they did finish after all: their costs count
    settle(slow, D("0.1"))
    settle(fresh, D("0.1"))
    state = budget_state(budgets.BudgetSpec.of(budget))
    assert (state.spent, state.reserved) == (D("0.5"), D(0))


# --- concurrency at the boundary ---------------------------------------------------------


@pytest.mark.parametrize("actual", ["max", "half"])
def test_64_concurrent_requests_at_the_boundary_overshoot_by_at_most_one_request(
    alice: Person, actual: str
) -> None:
    amount, start, cost = D("10"), D("9.90"), D("0.25")
    budget = _budget(alice, str(amount))
    _spend(alice, str(start))
    barrier = threading.Barrier(64)
    admitted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def request(i: int) -> None:
        barrier.wait()
        try:
            r = _reserve(alice, str(cost))
        except InsufficientQuota:
            with lock:
                refused.append(i)
            return
        with lock:
            admitted.append(i)
        settle(r, cost if actual == "max" else cost / 2)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    state = budget_state(budgets.BudgetSpec.of(budget))
    assert len(admitted) + len(refused) == 64
    # Only 0.10 was left and each request holds 0.25: exactly one gets in.
    assert len(admitted) == 1
    assert state.spent <= amount + cost
    assert state.reserved == 0


def test_64_concurrent_asyncio_requests_overshoot_by_at_most_one_request(alice: Person) -> None:
    amount, cost = D("5"), D("0.30")
    budget = _budget(alice, str(amount))
    _spend(alice, "4")  # 1.00 left: the holds of four requests fit under the line

    async def one() -> bool:
        try:
            r = await areserve(
                organization_id=alice.organization.pk, api_key_id=None, max_cost=cost
            )
        except InsufficientQuota:
            return False
        await asyncio.sleep(0.01)  # the request runs while the others arrive
        await asettle(r, cost)
        return True

    async def run() -> list[bool]:
        return await asyncio.gather(*(one() for _ in range(64)))

    results = asyncio.run(run())
    spent = budget_state(budgets.BudgetSpec.of(budget)).spent
    # 4.00, 4.30, 4.60, 4.90 are all below 5: four admitted, the fourth overshoots by 0.20.
    assert results.count(True) == 4
    assert amount < spent <= amount + cost


# --- month rollover ----------------------------------------------------------------------


def test_a_spent_monthly_budget_comes_back_at_the_month_boundary(alice: Person) -> None:
    _budget(alice, "1")
    last_second = datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC)
    _spend(alice, "1", at=last_second)
    with pytest.raises(InsufficientQuota) as refused:
        _reserve(alice, "0.01", at=last_second)
    assert "resets at 2025-02-01T00:00:00Z" in str(refused.value.detail)
    february = datetime(2025, 2, 1, tzinfo=UTC)
    r = _reserve(alice, "0.50", at=february)
    settle(r, D("0.50"))
    with pytest.raises(InsufficientQuota):  # January stays spent
        _reserve(alice, "0.01", at=last_second)


def test_a_days_budget_resets_every_n_days_from_its_anchor(alice: Person) -> None:
    anchor = datetime(2025, 5, 1, 12, tzinfo=UTC)
    _budget(alice, "1", period="days", period_days=3, anchor=anchor)
    _spend(alice, "1", at=anchor + timedelta(days=2, hours=23))
    with pytest.raises(InsufficientQuota) as refused:
        _reserve(alice, "0.01", at=anchor + timedelta(days=1))
    assert "resets at 2025-05-04T12:00:00Z" in str(refused.value.detail)
    _reserve(alice, "0.01", at=anchor + timedelta(days=3))


# --- Redis lost: rebuilt from the ledger --------------------------------------------------


def _price(
    meter: str, price: str, *, model: str = "*", since: datetime, until: datetime | None = None
) -> None:
    PriceBookEntry.objects.create(
        meter=meter,
        model=model,
        unit="1M tokens",
        per_units=1_000_000,
        unit_price=D(price),
        effective_from=since,
        effective_to=until,
    )


def _ledger(person: Person, meter: str, quantity: int, at: datetime, **extra: object) -> None:
    LedgerEntry.objects.create(
        organization=person.organization,
        idempotency_key=f"test-{meter}-{at.timestamp()}-{quantity}-{extra}",
        meter=meter,
        quantity=quantity,
        occurred_at=at,
        source="test",
        **extra,
    )


def test_ledger_spend_rates_each_piece_at_the_price_in_force(
    alice: Person, charlie: Person
) -> None:
    PriceBookEntry.objects.all().delete()
    month = datetime(2025, 6, 1, tzinfo=UTC)
    change = month + timedelta(days=10)
    _price(Meter.PROMPT_TOKENS, "1", since=month - timedelta(days=60), until=change)
    _price(Meter.PROMPT_TOKENS, "2", since=change)
    _price(Meter.PROMPT_TOKENS, "5", model="big", since=month - timedelta(days=60))
    key = alice.membership.api_keys.get().pk
    _ledger(
        alice,
        Meter.PROMPT_TOKENS,
        1_000_000,
        month + timedelta(days=1),
        model="small",
        api_key_id=key,
    )
    _ledger(alice, Meter.PROMPT_TOKENS, 1_000_000, month + timedelta(days=11), model="small")
    _ledger(alice, Meter.PROMPT_TOKENS, 2_000_000, month + timedelta(days=12), model="big")
    _ledger(alice, Meter.ROYALTY_TOKENS, 9_000_000, month + timedelta(days=2))  # earnings
    _ledger(
        alice,
        Meter.TRAINING_TOKENS,
        1000,
        month + timedelta(days=3),
        unit_price=D("0.5"),
        per_units=1000,
    )
    _ledger(alice, Meter.PROMPT_TOKENS, 1_000_000, month - timedelta(seconds=1), model="small")
    _ledger(charlie, Meter.PROMPT_TOKENS, 7_000_000, month + timedelta(days=1), model="small")

    end = month + timedelta(days=30)
    org = ledger_spend(organization_id=alice.organization.pk, api_key_id=None, start=month, end=end)
    assert org == D("1") + D("2") + D("10") + D("0.5")
    one_key = ledger_spend(
        organization_id=alice.organization.pk, api_key_id=key, start=month, end=end
    )
    assert one_key == D("1")


def test_a_budget_lost_from_redis_is_rebuilt_from_the_ledger(alice: Person) -> None:
    PriceBookEntry.objects.all().delete()
    now = datetime.now(UTC)
    _price(Meter.COMPLETION_TOKENS, "10", since=now - timedelta(days=400))
    budget = _budget(alice, "5")
    _ledger(alice, Meter.COMPLETION_TOKENS, 450_000, now - timedelta(seconds=5), model="m")  # $4.50
    r = _reserve(alice, "0.40")  # first sight of this period: rebuilt at $4.50
    state = budget_state(budgets.BudgetSpec.of(budget))
    assert (state.spent, state.reserved) == (D("4.5"), D("0.4"))
    settle(r, D("0.40"))
    _ledger(
        alice, Meter.COMPLETION_TOKENS, 40_000, now - timedelta(seconds=1), model="m"
    )  # its ledger entry

    client = sync_client()
    client.delete(*client.scan_iter(match=f"{budgets.key('bud')}*"))  # Redis lost everything
    _reserve(alice, "0.10")  # 4.90 from the ledger: still under (the hold reaches 5.00)
    with pytest.raises(InsufficientQuota):
        _reserve(alice, "0.01")


# --- alerts ------------------------------------------------------------------------------


def test_crossing_a_threshold_alerts_once_per_period_by_audit_and_email(alice: Person) -> None:
    join(alice.organization, "billy@acme.test", "billing")
    join(alice.organization, "dev@acme.test", "developer")
    budget = _budget(alice, "10", kind="soft", alert_thresholds=[50, 100], name="team")
    mail.outbox.clear()
    _spend(alice, "4")
    assert not BudgetAlert.objects.for_organization(alice.organization).exists()
    _spend(alice, "2")  # 60%: the 50% alert
    _spend(alice, "1")  # 70%: nothing new
    alerts = BudgetAlert.objects.for_organization(alice.organization)
    assert [a.threshold for a in alerts] == [50]
    assert len(mail.outbox) == 1
    assert sorted(mail.outbox[0].to) == ["alice@acme.test", "billy@acme.test"]
    assert "50% of team" in mail.outbox[0].subject
    audit = AuditLog.objects.for_organization(alice.organization).filter(
        action="budget.threshold_crossed"
    )
    assert [(a.target_id, a.details["threshold"]) for a in audit] == [(budget.pk, 50)]

    _spend(alice, "5")  # 120%: the 100% alert, once, and a soft budget still admits
    _spend(alice, "1")
    assert sorted(a.threshold for a in alerts.all()) == [50, 100]
    assert len(mail.outbox) == 2


def test_an_alert_is_not_sent_twice_even_when_redis_forgot_it(alice: Person) -> None:
    _budget(alice, "10", kind="soft", alert_thresholds=[50])
    mail.outbox.clear()
    _spend(alice, "6")
    client = sync_client()
    for name in client.scan_iter(match=f"{budgets.key('bud')}*"):
        client.hdel(name, "a:50")
    _spend(alice, "1")
    assert BudgetAlert.objects.for_organization(alice.organization).count() == 1
    assert len(mail.outbox) == 1


def test_a_new_period_alerts_again(alice: Person) -> None:
    _budget(alice, "1", kind="soft", alert_thresholds=[80])
    _spend(alice, "0.9", at=datetime(2025, 1, 20, tzinfo=UTC))
    _spend(alice, "0.9", at=datetime(2025, 2, 20, tzinfo=UTC))
    periods = BudgetAlert.objects.for_organization(alice.organization).values_list(
        "period_start", flat=True
    )
    assert sorted(p.month for p in periods) == [1, 2]
