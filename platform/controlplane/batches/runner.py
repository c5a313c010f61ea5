"""Running a batch: its pending lines to the inference workers' low-priority list, and
each answer written to its line's row.

The runner keeps at most BATCH_IN_FLIGHT lines sent and unanswered, each request
with a deadline (BATCH_LINE_TIMEOUT_SECONDS): the worker drops it past that, and
the runner then takes it as lost (its worker died) and sends it again. Answers are
written by `UPDATE … WHERE status = 'pending'` in chunks, with their ledger entries
(at the batch price) in the same transaction: a runner or worker killed mid-batch
loses no recorded line, and no line is answered, or billed, twice. Lines do not pass
the serving path's admission: they count against budgets (their cost is settled
into the budget counters), not against per-minute rate limits.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from decimal import Decimal
from typing import Any

import orjson
import structlog
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from controlplane.billing.ledger import Entry, ledger_append_many
from controlplane.billing.models import Meter
from controlplane.billing.prices import unit_prices
from controlplane.core.errors import ApiError, error_parts
from controlplane.core.redis_clients import listening_client, sync_client
from controlplane.core.serializers import validated_reusing
from controlplane.limits import budgets
from controlplane.serving import gateway
from controlplane.serving.endpoints import ENDPOINTS, Endpoint
from controlplane.tenancy.models import Organization
from jobcontracts import queues
from jobcontracts.inference import (
    BATCH_REQUEST_PREFIX,
    DONE,
    ERROR,
    InferenceRequest,
    ModelRef,
    Reply,
    batch_queue,
    cancel_key,
)

from . import services
from .models import Batch, BatchLine, BatchStatus, LineStatus

log = structlog.get_logger(__name__)

#: Worker errors worth another try (a model still loading, a worker at capacity).
_RETRYABLE = frozenset({"model_loading", "overloaded", "no_capacity", "worker_lost"})


@dataclasses.dataclass
class _Sent:
    line_id: int
    endpoint: type[Endpoint]
    request: InferenceRequest
    data: dict[str, Any]
    deadline: float


@dataclasses.dataclass
class _Result:
    line_id: int
    request_id: str
    response: dict[str, Any] | None
    error: dict[str, Any] | None
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response.get("status_code") == 200


def _trace_id(batch: Batch, line: BatchLine) -> str:
    """A line's trace id, as the worker logs it: `<batch id>:<custom_id>`, what its caller
    knows the line by (the request id names only the line's row and attempt). A custom_id
    a log line should not carry (free text, past 128 characters) leaves the batch's id."""
    custom = line.custom_id
    if (
        custom
        and len(custom) <= 128
        and all(c.isascii() and (c.isalnum() or c in "._:-") for c in custom)
    ):
        return f"{batch.pk}:{custom}"
    return str(batch.pk)


def advisory_key(batch_id: str) -> int:
    return int.from_bytes(batch_id.encode()[-8:].rjust(8, b"\0"), "big") & 0x7FFF_FFFF_FFFF_FFFF


class Runner:
    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.organization = Organization.objects.get(pk=batch.organization_id)
        self.channel = f"atelier:batch:{batch.pk}:{secrets.token_hex(4)}"
        self.queue = batch_queue(queues.GPU_INFERENCE)
        self.refs: dict[tuple[str, str], ModelRef | ApiError] = {}
        self.sent: dict[str, _Sent] = {}
        self.done: list[_Result] = []
        self.backlog: list[BatchLine] = []
        self.factor = Decimal(settings.BATCH_PRICE_FACTOR)
        self.prices: dict[str, tuple[Decimal, Decimal]] = {}
        self.stopping = False
        #: A budget hold (of nothing) the next answers' cost is settled through.
        self.hold: budgets.Reservation | None = None

    # --- preparing a line ------------------------------------------------------------

    def _ref(self, model_id: Any, kind: str) -> ModelRef:
        key = (str(model_id), kind)
        if key not in self.refs:
            try:
                self.refs[key] = gateway.model_ref(
                    organization=self.organization,
                    model_id=gateway.ensure_known(model_id),
                    kind=kind,
                )
            except ApiError as error:
                self.refs[key] = error
        found = self.refs[key]
        if isinstance(found, ApiError):
            raise found
        return found

    def _prepare(self, line: BatchLine) -> _Sent | _Result:
        rid = f"{BATCH_REQUEST_PREFIX}{line.pk}-{line.attempts + 1}"
        if line.url != self.batch.endpoint:
            return _Result(
                line.pk,
                rid,
                None,
                {
                    "code": "invalid_url",
                    "message": f"The line's url '{line.url}' is not the batch's endpoint "
                    f"'{self.batch.endpoint}': every line of a batch calls its endpoint.",
                },
            )
        endpoint = ENDPOINTS[line.url]
        try:
            # One serializer per class, reused (as the serving path does): making one
            # deep-copies its fields, most of the cost of a line here.
            data = validated_reusing(endpoint.input_serializer, line.body)
            if data.get("stream"):
                raise ApiError("'stream' is not supported in a batch.", param="stream")
            model = self._ref(data.get("model"), endpoint.kind)
            request = endpoint.prepare(
                data,
                organization_id=self.organization.pk,
                api_key_id=self.batch.api_key_id,
                model=model,
                timeout=settings.BATCH_LINE_TIMEOUT_SECONDS,
                reply_to=self.channel,
            )
        except Exception as error:  # a bad body or a model the caller cannot use: the line's error
            status, body, _ = error_parts(error)
            return _Result(
                line.pk, rid, {"status_code": status, "request_id": rid, "body": body}, None
            )
        request = dataclasses.replace(request, request_id=rid, trace_id=_trace_id(self.batch, line))
        return _Sent(line.pk, endpoint, request, data, request.deadline + 5)

    # --- the loop ------------------------------------------------------------------

    def run(self) -> None:
        client = sync_client()
        listener = listening_client()
        pubsub = listener.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(self.channel)
        last_flush, last_check = time.monotonic(), 0.0  # the state checked first
        try:
            while True:
                now = time.monotonic()
                if now - last_check > 1.0:
                    last_check = now
                    self._check_state()
                if not self.stopping:
                    self._refill(client)
                if not self.sent and not self.backlog and (self.stopping or not self._fetch()):
                    break
                message = pubsub.get_message(timeout=0.05)
                while message is not None:
                    if message["type"] == "message":
                        self._replies(orjson.loads(message["data"]))
                    message = pubsub.get_message(timeout=0)
                self._lost(time.time())
                if len(self.done) >= settings.BATCH_CHUNK or (
                    self.done and time.monotonic() - last_flush > 0.5
                ):
                    self._flush()
                    last_flush = time.monotonic()
            self._flush()
            if self.hold is not None:
                async_to_sync(budgets.asettle)(self.hold, Decimal(0))
        finally:
            pubsub.close()
            listener.close()

    def _check_state(self) -> None:
        status, expires_at = (
            Batch.objects.for_organization(self.batch.organization_id)
            .filter(pk=self.batch.pk)
            .values_list("status", "expires_at")
            .get()
        )
        if status == BatchStatus.CANCELLING or expires_at <= timezone.now():
            self.stopping = True
            self.backlog.clear()
            # Lines with a worker are stopped (their results, if any, are not recorded).
            with sync_client().pipeline(transaction=False) as pipe:
                for rid in self.sent:
                    pipe.set(cancel_key(rid), b"1", ex=600)
                pipe.execute()
            self.sent.clear()

    def _fetch(self) -> bool:
        self._flush()
        busy = [s.line_id for s in self.sent.values()]
        self.backlog = list(
            BatchLine.objects.filter(batch=self.batch, status=LineStatus.PENDING)
            .exclude(pk__in=busy)
            .order_by("index")[: settings.BATCH_CHUNK]
        )
        return bool(self.backlog)

    def _refill(self, client: Any) -> None:
        room = settings.BATCH_IN_FLIGHT - len(self.sent)
        if room <= 0:
            return
        if not self.backlog:
            self._fetch()
        take, self.backlog = self.backlog[:room], self.backlog[room:]
        if not take:
            return
        try:
            # Refused once a hard budget is spent; holds nothing (the cost is counted
            # when the lines are answered, `_flush`).
            check = async_to_sync(budgets.areserve)(
                organization_id=self.organization.pk,
                api_key_id=self.batch.api_key_id,
                max_cost=Decimal(0),
            )
            if self.hold is None:
                self.hold = check  # settled with the next answers' cost
            else:
                async_to_sync(budgets.asettle)(check, Decimal(0))
        except budgets.InsufficientQuota as refusal:
            status, body, _ = error_parts(refusal)
            for line in take:
                rid = f"{BATCH_REQUEST_PREFIX}{line.pk}-{line.attempts + 1}"
                self.done.append(
                    _Result(
                        line.pk, rid, {"status_code": status, "request_id": rid, "body": body}, None
                    )
                )
            return
        raws: list[bytes] = []
        for line in take:
            prepared = self._prepare(line)
            if isinstance(prepared, _Result):
                self.done.append(prepared)
                continue
            self.sent[prepared.request.request_id] = prepared
            raws.append(orjson.dumps(prepared.request))
        if raws:
            BatchLine.objects.filter(pk__in=[line.pk for line in take]).update(
                attempts=F("attempts") + 1
            )
            client.lpush(self.queue, *raws)

    def _replies(self, payload: Any) -> None:
        for reply in Reply.batch_from_json(payload):
            sent = self.sent.get(reply.request_id)
            if sent is None or reply.type not in (DONE, ERROR):
                continue
            usage = reply.data.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            if reply.type == DONE:
                body = sent.endpoint.body(sent.request, reply, sent.data)
                response = {"status_code": 200, "request_id": reply.request_id, "body": body}
            else:
                if reply.data.get("code") in _RETRYABLE and not prompt_tokens:
                    del self.sent[reply.request_id]  # stays pending: sent again
                    continue
                error = gateway.failure(reply)
                status, body, _ = error_parts(error)
                response = {"status_code": status, "request_id": reply.request_id, "body": body}
            del self.sent[reply.request_id]
            self.done.append(
                _Result(
                    sent.line_id,
                    reply.request_id,
                    response,
                    None,
                    sent.request.model.id,
                    prompt_tokens,
                    completion_tokens,
                )
            )

    def _lost(self, now: float) -> None:
        for rid in [rid for rid, s in self.sent.items() if s.deadline < now]:
            log.warning("batches.line_lost", batch_id=self.batch.pk, request_id=rid)
            del self.sent[rid]  # still pending in the database: fetched and sent again

    # --- recording -----------------------------------------------------------------

    def _price(self, model: str) -> tuple[Decimal, Decimal]:
        if model not in self.prices:
            live = unit_prices(
                model, [Meter.PROMPT_TOKENS, Meter.COMPLETION_TOKENS], timezone.now()
            )
            self.prices[model] = (live[0] * self.factor, live[1] * self.factor)
        return self.prices[model]

    def _count_spend(self, cost: Decimal) -> None:
        """Add what answered lines cost to the budgets' counters (a settle counts its
        cost whatever it held): through the hold the last refill took, else a new one."""
        hold, self.hold = self.hold, None
        if hold is None:
            try:
                hold = async_to_sync(budgets.areserve)(
                    organization_id=self.organization.pk,
                    api_key_id=self.batch.api_key_id,
                    max_cost=Decimal(0),
                )
            except budgets.InsufficientQuota:
                # Already past a hard budget: the counter says so; the ledger has the cost.
                log.warning("batches.spend_past_budget", batch_id=self.batch.pk, cost=str(cost))
                return
        async_to_sync(budgets.asettle)(hold, cost)

    def _flush(self) -> None:
        if not self.done:
            return
        results, self.done = self.done, []
        # A line answered twice in one flush (sent again after a lost worker, then both
        # answers came): the first one is its answer, and the only one counted.
        results = list({r.line_id: r for r in reversed(results)}.values())[::-1]
        now = timezone.now()
        with transaction.atomic():
            written = set(_record(results, now))
            # The counts move with the lines written, in their transaction (counting
            # every line of the batch at each flush grew with the batch: N²).
            succeeded = sum(1 for r in results if r.line_id in written and r.ok)
            if written:
                Batch.objects.for_organization(self.batch.organization_id).filter(
                    pk=self.batch.pk
                ).update(
                    completed=F("completed") + succeeded,
                    failed=F("failed") + len(written) - succeeded,
                )
            entries: list[Entry] = []
            cost = Decimal(0)
            for r in results:
                if r.line_id not in written or not r.model:
                    continue
                prompt, completion = self._price(r.model)
                cost += r.prompt_tokens * prompt + r.completion_tokens * completion
                for meter, quantity, price in (
                    (Meter.PROMPT_TOKENS, r.prompt_tokens, prompt),
                    (Meter.COMPLETION_TOKENS, r.completion_tokens, completion),
                ):
                    entries.append(
                        Entry(
                            organization_id=self.organization.pk,
                            idempotency_key=f"batch:{self.batch.pk}:{r.line_id}:{meter.split('.')[-1]}",
                            meter=meter,
                            quantity=quantity,
                            occurred_at=now,
                            source="batches",
                            model=r.model,
                            api_key_id=self.batch.api_key_id,
                            reference=self.batch.pk,
                            unit_price=price * 1_000_000,
                            per_units=1_000_000,
                        )
                    )
            ledger_append_many(entries)
        if cost:
            self._count_spend(cost)


def models_F(name: str) -> Any:
    from django.db.models import F

    return F(name)


_RECORD = """
UPDATE batches_batchline AS l SET
    status = v.status, request_id = v.request_id, response = v.response::jsonb,
    error = v.error::jsonb, prompt_tokens = v.prompt_tokens,
    completion_tokens = v.completion_tokens, finished_at = %s
FROM unnest(
    %s::bigint[], %s::varchar[], %s::varchar[], %s::text[], %s::text[], %s::int[], %s::int[]
)
    AS v(id, status, request_id, response, error, prompt_tokens, completion_tokens)
WHERE l.id = v.id AND l.status = 'pending'
RETURNING l.id
"""


def _record(results: list[_Result], now: Any) -> list[int]:
    """Write results to still-pending lines only; the ids actually written."""
    columns: list[list[Any]] = [[], [], [], [], [], [], []]
    for r in results:
        for column, value in zip(
            columns,
            (
                r.line_id,
                LineStatus.SUCCEEDED if r.ok else LineStatus.FAILED,
                r.request_id,
                orjson.dumps(r.response).decode() if r.response is not None else None,
                orjson.dumps(r.error).decode() if r.error is not None else None,
                r.prompt_tokens,
                r.completion_tokens,
            ),
            strict=True,
        ):
            column.append(value)
    with connection.cursor() as cursor:
        cursor.execute(_RECORD, [now, *columns])
        return [row[0] for row in cursor.fetchall()]


def batch_run(*, batch_id: str, organization_id: str) -> str:
    """Run a batch to its end; safe to run twice (a second runner waits its turn)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [advisory_key(batch_id)])
        if not cursor.fetchone()[0]:
            return "busy"
    try:
        batch = (
            Batch.objects.for_organization(organization_id)
            .select_related("input_file")
            .get(pk=batch_id)
        )
        if batch.status == BatchStatus.VALIDATING and not services.batch_load_lines(batch=batch):
            batch.refresh_from_db()
            if batch.status == BatchStatus.VALIDATING:
                return "waiting"
        batch.refresh_from_db()
        if batch.status == BatchStatus.IN_PROGRESS:
            Runner(batch).run()
            batch.refresh_from_db()
        if batch.status in (
            BatchStatus.IN_PROGRESS,
            BatchStatus.CANCELLING,
            BatchStatus.FINALIZING,
        ):
            if batch.status == BatchStatus.CANCELLING:
                ending = BatchStatus.CANCELLED
            elif (
                batch.expires_at <= timezone.now()
                and BatchLine.objects.filter(batch=batch, status=LineStatus.PENDING).exists()
            ):
                ending = BatchStatus.EXPIRED
            else:
                ending = BatchStatus.COMPLETED
            services.batch_finalize(batch=batch, ending=ending)
        batch.refresh_from_db()
        return str(batch.status)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [advisory_key(batch_id)])
