"""Admission: a full queue answers 503 at once, a request past its deadline is dropped
unanswered and unbilled, bad input and missing models get clean errors."""

from __future__ import annotations

import dataclasses
import time

from gpuworkers.replies import MemoryChannel
from jobcontracts.inference import BATCH_REQUEST_PREFIX, InferenceRequest, ModelRef
from tests.gpuworkers.inference_support import (
    model_ref,
    request,
    run,
    running_engine,
    texts,
    varied_model_dir,
)


def test_a_full_queue_answers_503_overloaded_at_once_instead_of_queueing() -> None:
    ref = model_ref(varied_model_dir())
    with running_engine(start=False, max_queue=2) as (engine, channel):
        queued = [request(ref, max_tokens=4) for _ in range(2)]
        tickets = [engine.submit(r) for r in queued]
        refused = request(ref, max_tokens=4)
        started = time.monotonic()
        refused_ticket = engine.submit(refused)
        assert refused_ticket.wait(0.5) is None  # answered without the engine running at all
        assert time.monotonic() - started < 0.5
        engine.start()
        for ticket in tickets:
            assert ticket.wait(60) is not None
        error = channel.wait_final(refused.request_id)
        assert [r.type for r in channel.replies[refused.request_id]] == ["error"]
        assert error.data == {
            "status": 503,
            "code": "overloaded",
            "message": "the model is overloaded: retry in a moment",
        }
        assert refused_ticket.outcome == "overloaded"
        # Once the queue drains, requests are accepted again.
        (later,) = run(engine, channel, request(ref, max_tokens=4))
        assert later.type == "done"


def test_a_request_past_its_deadline_is_dropped_unanswered_and_unbilled() -> None:
    ref = model_ref(varied_model_dir())
    with running_engine(start=False) as (engine, channel):
        expired = request(ref, max_tokens=4, deadline=time.time() - 1)
        gave_up = request(ref, max_tokens=4, deadline=time.time() + 0.2)
        waiting = request(ref, max_tokens=4, deadline=time.time() + 60)
        tickets = [engine.submit(r) for r in (expired, gave_up, waiting)]
        assert tickets[0].done  # dropped on arrival
        time.sleep(0.3)  # the engine is busy elsewhere: the second caller gives up meanwhile
        engine.start()
        usages = [t.wait(60) for t in tickets]
        assert channel.wait_final(waiting.request_id).type == "done"
    assert [t.outcome for t in tickets] == ["dropped", "dropped", "completed"]
    assert usages[0] is None
    assert usages[1] is None
    assert usages[2] is not None
    assert channel.replies[expired.request_id] == []
    assert channel.replies[gave_up.request_id] == []


def test_a_request_cancelled_before_it_starts_is_dropped() -> None:
    ref = model_ref(varied_model_dir())
    with running_engine(start=False) as (engine, channel):
        req = request(ref, max_tokens=4)
        channel.cancel(req.request_id)
        ticket = engine.submit(req)
        time.sleep(0.05)  # the outbox reads the cancel keys of the requests it watches
        engine.start()
        assert ticket.wait(60) is None
    assert ticket.outcome == "dropped"
    assert channel.replies[req.request_id] == []


def test_a_prompt_longer_than_the_context_is_a_400_naming_the_limit() -> None:
    ref = model_ref(varied_model_dir(), context_length=32)
    with running_engine() as (engine, channel):
        (reply,) = run(engine, channel, request(ref, prompt="the cat sat on the mat " * 20))
        (fits,) = run(engine, channel, request(ref, prompt="the cat", max_tokens=200))
    assert reply.type == "error"
    assert reply.data["status"] == 400
    assert reply.data["code"] == "context_length_exceeded"
    assert "32" in reply.data["message"]
    # max_tokens beyond the context stops at the context: finish_reason "length".
    assert fits.data["choices"][0]["finish_reason"] in ("length", "stop")
    assert fits.data["usage"]["total_tokens"] <= 32


def test_empty_messages_and_missing_models_get_clean_errors() -> None:
    ref = model_ref(varied_model_dir())
    missing = ModelRef(
        id="gone",
        base_name="gone",
        base_uri="file:///nonexistent/model",
        family="llama",
        task="causal_lm",
        context_length=256,
    )
    with running_engine() as (engine, channel):
        empty, gone, wrong_task = run(
            engine,
            channel,
            request(ref, kind="chat", prompt=None, messages=[]),
            request(missing),
            request(ref, kind="classification", prompt=None, inputs=("x",)),
        )
        (still_fine,) = run(engine, channel, request(ref, max_tokens=3))
    assert (empty.type, empty.data["status"], empty.data["code"]) == (
        "error",
        400,
        "invalid_messages",
    )
    assert (gone.type, gone.data["status"], gone.data["code"]) == (
        "error",
        503,
        "model_unavailable",
    )
    assert wrong_task.data["code"] == "unsupported_model"
    assert len(texts(still_fine)) == 1


def test_a_long_silent_request_gets_heartbeats_until_it_is_done() -> None:
    ref = model_ref(varied_model_dir())
    with running_engine(heartbeat_s=0.05) as (engine, channel):
        long = request(ref, prompt="one", max_tokens=240)  # not streamed: silent until done
        (reply,) = run(engine, channel, long)
        time.sleep(0.2)  # nothing more after done
        kinds = [r.type for r in channel.replies[long.request_id]]
    assert reply.type == "done"
    assert kinds[0] == "start"
    assert kinds[-1] == "done"
    assert "heartbeat" in kinds
    assert set(kinds[1:-1]) == {"heartbeat"}


def _batch_line(req: InferenceRequest) -> InferenceRequest:
    """The same request as a Batch API line (what the batch runner sends)."""
    return dataclasses.replace(req, request_id=f"{BATCH_REQUEST_PREFIX}{req.request_id}")


def _started(channel: MemoryChannel, requests: list[InferenceRequest], count: int) -> None:
    deadline = time.monotonic() + 60
    while sum(bool(channel.replies[r.request_id]) for r in requests) < count:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_live_request_overtakes_a_full_batch_lane_and_its_waiting_lines() -> None:
    ref = model_ref(varied_model_dir())
    with running_engine(max_batch=4) as (engine, channel):
        lines = [
            _batch_line(request(ref, prompt=f"the cat sat on {i}", max_tokens=200))
            for i in range(6)
        ]
        tickets = [engine.submit(line) for line in lines]
        _started(channel, lines, 4)  # the engine's 4 rows decode batch lines, 2 wait
        live = request(ref, max_tokens=8)
        assert engine.submit(live).wait(60) is not None
        # It did not wait for rows to free up, nor behind the lines already waiting.
        assert not any(ticket.done for ticket in tickets)
        assert channel.wait_final(live.request_id).type == "done"
        for ticket in tickets:
            assert ticket.wait(120) is not None
    assert all(channel.wait_final(line.request_id).type == "done" for line in lines)


def test_batch_lines_never_decode_in_the_same_forward_as_live_requests() -> None:
    ref = model_ref(varied_model_dir())
    with running_engine() as (engine, channel):
        lines = [
            _batch_line(request(ref, prompt=f"the cat sat on {i}", max_tokens=64)) for i in range(6)
        ]
        tickets = [engine.submit(line) for line in lines]
        _started(channel, lines, 6)
        live = [request(ref, prompt=f"a dog {i}", max_tokens=16) for i in range(3)]
        replies = run(engine, channel, *live)
        for ticket in tickets:
            assert ticket.wait(120) is not None
    assert [reply.type for reply in replies] == ["done"] * 3
    # 6 batch rows, then 3 live ones: never the 9 together (a row more slows every step).
    assert engine.stats.peak_rows == 6
