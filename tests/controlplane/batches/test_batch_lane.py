"""The inference worker's low-priority lane: a batch request is taken only when no live
one waits, and only a few while live requests run (gpuworkers.inference.intake)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from gpuworkers.inference import intake as intake_module
from gpuworkers.inference.intake import Intake
from gpuworkers.inference.jobs import Ticket
from jobcontracts.inference import InferenceRequest, ModelRef, Params, batch_queue, request_queue


class Engine:
    """Takes requests and holds them until the test ends them."""

    def __init__(self) -> None:
        self.taken: list[str] = []
        self.tickets: dict[str, Ticket] = {}

    def submit_many(self, requests: list[InferenceRequest]) -> list[Ticket]:
        out = []
        for request in requests:
            self.taken.append(request.request_id)
            out.append(self.tickets.setdefault(request.request_id, Ticket(request.request_id)))
        return out

    def end(self, prefix: str) -> None:
        for rid, ticket in self.tickets.items():
            if rid.startswith(prefix):
                ticket.resolve("completed")


def _request(rid: str) -> bytes:
    ref = ModelRef(
        id="m",
        base_name="m",
        base_uri="file:///m",
        family="llama",
        task="causal_lm",
        context_length=64,
    )
    return orjson.dumps(
        InferenceRequest(
            request_id=rid,
            organization_id="org_x",
            api_key_id=None,
            kind="completion",
            model=ref,
            params=Params(),
            inputs=("hi",),
        )
    )


def _wait(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def lane(settings: Any) -> Iterator[tuple[Intake, Engine, Any, str]]:
    url = str(settings.REDIS_URL)
    queue = f"test.lane.{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    engine = Engine()
    intake = Intake(
        url=url,
        queue=queue,
        capacity=16,
        engine=lambda: engine,
        batch_capacity=6,
        batch_capacity_busy=1,
    )
    try:
        yield intake, engine, client, queue
    finally:
        intake.stop()
        client.delete(request_queue(queue), batch_queue(queue))


def test_live_requests_go_first_and_batch_ones_fill_only_the_spare_room(
    lane: tuple[Intake, Engine, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_module, "BATCH_QUIET_SECONDS", 0.3)
    intake, engine, client, queue = lane
    client.lpush(batch_queue(queue), *[_request(f"batch-{i}") for i in range(10)])
    client.lpush(request_queue(queue), *[_request(f"live-{i}") for i in range(3)])
    intake.start()
    _wait(lambda: len(engine.taken) >= 4)
    time.sleep(0.2)
    # Every live request before any batch one; while they run, one batch request only.
    assert engine.taken[:3] == ["live-0", "live-1", "live-2"]
    assert engine.taken[3:] == ["batch-0"]
    # Live done and quiet: the batch fills its idle room (6), no more.
    engine.end("live-")
    _wait(lambda: len(engine.taken) >= 3 + 6)
    time.sleep(0.2)
    assert len(engine.taken) == 9
    # A live request arriving now is taken at once, ahead of the waiting batch ones.
    client.lpush(request_queue(queue), _request("live-late"))
    _wait(lambda: "live-late" in engine.taken)
    assert engine.taken[-1] == "live-late"
    assert client.llen(batch_queue(queue)) == 4


def test_an_idle_worker_holds_the_next_cohort_of_batch_requests_too(settings: Any) -> None:
    # Unset, the batch room is three quarters of the capacity: the engine's rows and the
    # requests to start the moment they end, with a quarter kept for live requests.
    url = str(settings.REDIS_URL)
    queue = f"test.lane.{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    engine = Engine()
    intake = Intake(url=url, queue=queue, capacity=16, engine=lambda: engine)
    try:
        client.lpush(batch_queue(queue), *[_request(f"batch-{i}") for i in range(20)])
        intake.start()
        _wait(lambda: len(engine.taken) >= 12)
        time.sleep(0.3)
        assert len(engine.taken) == 12
        client.lpush(request_queue(queue), _request("live-0"))
        _wait(lambda: "live-0" in engine.taken)
    finally:
        intake.stop()
        client.delete(request_queue(queue), batch_queue(queue))
