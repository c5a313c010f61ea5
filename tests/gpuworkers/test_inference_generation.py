"""Text generation in the engine, in-process (no Celery): the same tokens as
`model.generate`, whatever the batch; streaming, stop strings, n, seeds, logprobs, cancel."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpuworkers.inference.scheduler import Engine
from gpuworkers.replies import MemoryChannel
from jobcontracts.inference import ModelRef, Reply
from tests.gpuworkers.inference_support import (
    deltas,
    model_ref,
    request,
    run,
    running_engine,
    texts,
    varied_model_dir,
)

PROMPTS = [
    "the cat sat on",
    "hello how can i help today your order has shipped it will arrive",
    "one",
    "the invoice is attached we are sorry for the delay our team will call you back",
    "refunds",
]


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, MemoryChannel]]:
    with running_engine() as served:
        yield served


@pytest.fixture(scope="module")
def ref() -> ModelRef:
    return model_ref(varied_model_dir())


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    folder = varied_model_dir()
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def generate(hf: tuple[Any, Any], prompt_ids: list[int], max_new: int, **kwargs: Any) -> list[int]:
    model, _ = hf
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, **kwargs
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def greedy_text(hf: tuple[Any, Any], prompt: str, max_new: int) -> str:
    _, tokenizer = hf
    ids = generate(hf, tokenizer(prompt)["input_ids"], max_new)
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def test_greedy_output_is_what_model_generate_gives(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    for prompt in PROMPTS[:3]:
        (reply,) = run(*engine, request(ref, prompt=prompt, max_tokens=24))
        assert texts(reply) == [greedy_text(hf, prompt, 24)]
        assert reply.data["choices"][0]["finish_reason"] == "length"
        assert reply.data["usage"]["completion_tokens"] == 24


def test_a_batch_of_different_lengths_gives_each_request_its_own_output(
    ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    # Not started until all are queued: they are prefilled and decoded as one batch.
    with running_engine(start=False) as (engine, channel):
        requests = [request(ref, prompt=p, max_tokens=8 + 5 * i) for i, p in enumerate(PROMPTS)]
        tickets = [engine.submit(r) for r in requests]
        engine.start()
        for ticket in tickets:
            ticket.wait(60)
        replies = [channel.wait_final(r.request_id) for r in requests]
        assert engine.stats.prefills == 1
        assert engine.stats.peak_rows == len(PROMPTS)
    for i, (prompt, reply) in enumerate(zip(PROMPTS, replies, strict=True)):
        assert texts(reply) == [greedy_text(hf, prompt, 8 + 5 * i)], prompt
    assert len({texts(r)[0] for r in replies}) == len(PROMPTS)  # varied: a real check


def test_requests_that_join_a_running_batch_get_their_own_output(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    served, channel = engine
    long = request(ref, prompt=PROMPTS[3], max_tokens=120, stream=True)
    first_delta = threading.Event()

    def listen(reply: Reply) -> None:
        if reply.request_id == long.request_id and reply.type == "delta":
            first_delta.set()

    channel.listeners.append(listen)
    try:
        long_ticket = served.submit(long)
        assert first_delta.wait(30)
        joiners = [request(ref, prompt=p, max_tokens=10) for p in PROMPTS[:3]]
        joined = run(served, channel, *joiners)
        long_ticket.wait(60)
    finally:
        channel.listeners.remove(listen)
    assert not long_ticket.usage or long_ticket.usage.completion_tokens == 120
    assert texts(channel.wait_final(long.request_id)) == [greedy_text(hf, PROMPTS[3], 120)]
    for prompt, reply in zip(PROMPTS[:3], joined, strict=True):
        assert texts(reply) == [greedy_text(hf, prompt, 10)]


def test_streamed_deltas_add_up_to_the_final_text(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef
) -> None:
    requests = [request(ref, prompt=p, max_tokens=40, stream=True) for p in PROMPTS]
    replies = run(*engine, *requests)
    channel = engine[1]
    for r, reply in zip(requests, replies, strict=True):
        kinds = [m.type for m in channel.replies[r.request_id]]
        assert kinds[0] == "start"
        assert kinds[-1] == "done"
        assert kinds.count("delta") >= 2
        assert deltas(channel, r.request_id) == texts(reply)[0]
    start = channel.replies[requests[0].request_id][0]
    assert start.data["queue_ms"] >= 0
    assert start.data["load_ms"] >= 0


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef
) -> None:
    (full,) = run(*engine, request(ref, prompt=PROMPTS[1], max_tokens=40))
    text = texts(full)[0]
    stop = text[12:15]
    expected = text[: text.find(stop)]
    assert len(expected) >= 3

    stopped = request(
        ref, prompt=PROMPTS[1], max_tokens=40, stop=(stop, "never-there"), stream=True
    )
    (reply,) = run(*engine, stopped)

    assert texts(reply) == [expected]
    assert reply.data["choices"][0]["finish_reason"] == "stop"
    assert deltas(engine[1], stopped.request_id) == expected
    assert reply.data["usage"]["completion_tokens"] < 40


def test_n_choices_are_sampled_independently_and_a_seed_reproduces_them(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef
) -> None:
    def sampled(seed: int) -> Any:
        return request(ref, prompt="hello", max_tokens=16, n=3, temperature=1.0, seed=seed)

    first, again = run(*engine, sampled(7)), run(*engine, sampled(7))
    # The same seed in a batch with other requests, sampled and greedy.
    crowd = [
        request(ref, prompt=p, max_tokens=20, temperature=0.8, seed=i)
        for i, p in enumerate(PROMPTS)
    ]
    batched = run(*engine, sampled(7), *crowd)[0]
    other_seed = run(*engine, sampled(8))[0]

    choices = first[0].data["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len(set(texts(first[0]))) == 3
    assert texts(again[0]) == texts(first[0])
    assert texts(batched) == texts(first[0])
    assert texts(other_seed) != texts(first[0])
    assert first[0].data["usage"]["completion_tokens"] == 3 * 16


def test_a_tiny_top_p_keeps_only_the_most_likely_token(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    (reply,) = run(
        *engine, request(ref, prompt=PROMPTS[0], max_tokens=20, temperature=1.5, top_p=1e-6)
    )
    assert texts(reply) == [greedy_text(hf, PROMPTS[0], 20)]


def test_logprobs_are_the_models_own_with_one_entry_per_token(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    (reply,) = run(
        *engine, request(ref, prompt=PROMPTS[0], max_tokens=6, logprobs=True, top_logprobs=3)
    )
    entries = reply.data["choices"][0]["logprobs"]
    assert len(entries) == reply.data["usage"]["completion_tokens"] == 6

    model, tokenizer = hf
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    generated = generate(hf, prompt, 6)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    expected = torch.log_softmax(logits, -1)
    for k, entry in enumerate(entries):
        row = expected[len(prompt) - 1 + k]
        assert entry["logprob"] == pytest.approx(float(row[generated[k]]), abs=1e-4)
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert top[0]["logprob"] == pytest.approx(float(row.max()), abs=1e-4)
        assert top[0]["token"] == entry["token"]  # greedy takes the most likely


def test_chat_uses_the_models_chat_template(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    messages = [
        {"role": "system", "content": "please help"},
        {"role": "user", "content": "where is my order"},
    ]
    (reply,) = run(
        *engine, request(ref, kind="chat", prompt=None, messages=messages, max_tokens=20)
    )

    _, tokenizer = hf
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    expected = generate(hf, prompt, 20, eos_token_id=stops)
    assert texts(reply) == [tokenizer.decode(expected, skip_special_tokens=True)]
    assert reply.data["usage"]["prompt_tokens"] == len(prompt)


def test_cancel_stops_the_sequence_and_bills_only_what_it_produced(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef
) -> None:
    served, channel = engine
    req = request(ref, prompt="one", max_tokens=240, stream=True, logprobs=True)
    seen = []

    def cancel_after_three(reply: Reply) -> None:
        if reply.request_id == req.request_id and reply.type == "delta":
            seen.append(reply)
            if len(seen) == 3:
                channel.cancel(req.request_id)

    channel.listeners.append(cancel_after_three)
    try:
        ticket = served.submit(req)
        usage = ticket.wait(60)
    finally:
        channel.listeners.remove(cancel_after_three)

    reply = channel.wait_final(req.request_id)
    choice = reply.data["choices"][0]
    assert choice["finish_reason"] == "cancelled"
    produced = len(choice["logprobs"])
    assert 3 <= produced < 240
    assert reply.data["usage"]["completion_tokens"] == produced
    assert usage is not None
    assert usage.status == "cancelled"
    assert usage.completion_tokens == produced
    assert deltas(channel, req.request_id) == choice["text"]


def test_usage_is_reported_once_with_the_request_identity(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef
) -> None:
    served, _ = engine
    req = request(ref, prompt=PROMPTS[0], max_tokens=5)
    ticket = served.submit(req)
    usage = ticket.wait(60)
    assert usage is not None
    assert (usage.request_id, usage.organization_id, usage.api_key_id) == (
        req.request_id,
        "org-test",
        "key-test",
    )
    assert (usage.model, usage.kind, usage.status) == ("tiny", "completion", "completed")
    assert usage.completion_tokens == 5
    assert usage.prompt_tokens == len(
        AutoTokenizer.from_pretrained(varied_model_dir())(PROMPTS[0])["input_ids"]
    )
    assert usage.latency_ms > 0


def test_a_gpt2_batch_also_gives_each_request_what_generate_gives() -> None:
    folder = varied_model_dir("gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ref = model_ref(folder, name="tiny-gpt2")
    with running_engine(start=False) as (engine, channel):
        requests = [request(ref, prompt=p, max_tokens=12) for p in PROMPTS[:4]]
        tickets = [engine.submit(r) for r in requests]
        engine.start()
        for ticket in tickets:
            ticket.wait(60)
        replies = [channel.wait_final(r.request_id) for r in requests]
        assert engine.stats.prefills == 1
    for prompt, reply in zip(PROMPTS, replies, strict=False):
        assert texts(reply) == [greedy_text((model, tokenizer), prompt, 12)], prompt


def test_several_prompts_with_n_choices_are_numbered_prompt_by_prompt(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    req = request(ref, prompt=None, inputs=(PROMPTS[0], PROMPTS[2]), max_tokens=6, n=2)
    (reply,) = run(*engine, req)
    choices = reply.data["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    first, second = greedy_text(hf, PROMPTS[0], 6), greedy_text(hf, PROMPTS[2], 6)
    assert texts(reply) == [first, first, second, second]
    _, tokenizer = hf
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in (PROMPTS[0], PROMPTS[2]))
    assert reply.data["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 4 * 6,
        "total_tokens": prompt_tokens + 24,
    }


def test_a_forward_failing_part_way_fails_its_requests_billed_for_what_they_used(
    ref: ModelRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpuworkers.inference import decode

    forward = decode.DecodeBatch._forward
    calls = {"n": 0}

    def failing(self: Any, names: Any, **inputs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # the prefill, then three decode steps, then this one
            raise RuntimeError("device lost")
        return forward(self, names, **inputs)

    monkeypatch.setattr(decode.DecodeBatch, "_forward", failing)
    with running_engine() as (served, channel):
        req = request(ref, prompt=PROMPTS[0], max_tokens=50, stream=True)
        ticket = served.submit(req)
        usage = ticket.wait(60)
        error = channel.wait_final(req.request_id)
        (after,) = run(served, channel, request(ref, prompt=PROMPTS[0], max_tokens=3))
    assert error.type == "error"
    assert (error.data["status"], error.data["code"]) == (500, "inference_failed")
    assert usage is not None
    assert (usage.status, ticket.outcome) == ("failed", "failed")
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens == 4  # one from the prefill, three from decode steps
    # The error reply says the same, so the gateway settles the budget at what is billed.
    assert error.data["usage"] == {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": 4,
        "total_tokens": usage.prompt_tokens + 4,
    }
    assert after.type == "done"  # the model still serves the next request
