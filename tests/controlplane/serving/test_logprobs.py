"""Log-probabilities from the request body to the response the SDK parses, in-process.

Bodies as the official `openai` SDK sends them go through the endpoints' input
serializers and `prepare`, the real engine (tests/gpuworkers' tiny Llama with varied
weights) runs them, and its replies become the endpoints' bodies and stream chunks,
parsed with the SDK's own types. Every number is checked against log_softmax of the
model's logits at each step. tests/controlplane/serving/test_logprobs_sdk.py does the
same through real processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai.types as oai
import pytest
import torch
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoModelForCausalLM, AutoTokenizer

from controlplane.core.serializers import validated
from controlplane.serving.endpoints import ChatCompletions, Completions, Endpoint
from gpuworkers.inference.scheduler import Engine
from gpuworkers.replies import MemoryChannel
from jobcontracts.inference import InferenceRequest, ModelRef, Reply
from tests.gpuworkers.inference_support import model_ref, running_engine, varied_model_dir

TOL = 1e-4
PROMPT = "the cat sat on"
MESSAGES = [{"role": "user", "content": "where is my order"}]


@pytest.fixture(scope="module")
def ref() -> ModelRef:
    return model_ref(varied_model_dir())


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    folder = varied_model_dir()
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, MemoryChannel]]:
    with running_engine() as served:
        yield served


def prepared(api: type[Endpoint], body: dict[str, Any], ref: ModelRef) -> Any:
    data = validated(api.input_serializer, {"model": ref.id, **body})
    inference = api.prepare(
        data, organization_id="org-test", api_key_id="key-test", model=ref, timeout=60
    )
    return data, inference


def submit_all(engine: Engine, channel: MemoryChannel, *requests: InferenceRequest) -> list[Reply]:
    tickets = [engine.submit(r) for r in requests]
    for ticket in tickets:
        ticket.wait(120)
    return [channel.wait_final(r.request_id) for r in requests]


def reference(hf: tuple[Any, Any], prompt_ids: list[int], steps: int) -> list[torch.Tensor]:
    """log_softmax of the model's logits at each greedy step: what every logprob must be."""
    model, _ = hf
    ids = list(prompt_ids)
    rows = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            row = torch.log_softmax(logits, -1)
            rows.append(row)
            ids.append(int(row.argmax()))
    return rows


def chat_prompt(hf: tuple[Any, Any]) -> list[int]:
    _, tokenizer = hf
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_of(hf: tuple[Any, Any], token: int) -> str:
    return str(hf[1].decode([token]))


def check_chat_content(hf: tuple[Any, Any], content: list[Any], top: int) -> None:
    rows = reference(hf, chat_prompt(hf), len(content))
    for entry, row in zip(content, rows, strict=True):
        values, ids = row.topk(top)
        assert entry.token == text_of(hf, int(ids[0]))  # greedy: the likeliest token
        assert entry.logprob == pytest.approx(float(values[0]), abs=TOL)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == top
        for got, value, token in zip(entry.top_logprobs, values, ids, strict=True):
            assert got.logprob == pytest.approx(float(value), abs=TOL)
            assert got.token == text_of(hf, int(token))


def check_completion_logprobs(hf: tuple[Any, Any], logprobs: Any, top: int) -> None:
    prompt = list(hf[1](PROMPT)["input_ids"])
    rows = reference(hf, prompt, len(logprobs.tokens))
    offset = len(PROMPT)
    for k, row in enumerate(rows):
        values, ids = row.topk(max(1, top))
        assert logprobs.tokens[k] == text_of(hf, int(ids[0]))
        assert logprobs.token_logprobs[k] == pytest.approx(float(values[0]), abs=TOL)
        assert logprobs.text_offset[k] == offset
        offset += len(logprobs.tokens[k])
        shown = logprobs.top_logprobs[k]
        # The `logprobs` likeliest tokens, the sampled one always among them (OpenAI's
        # "up to logprobs + 1"): with greedy decoding, exactly max(1, logprobs).
        assert len(shown) == max(1, top)
        for value, token in zip(values, ids, strict=True):
            assert shown[text_of(hf, int(token))] == pytest.approx(float(value), abs=TOL)


def test_completions_logprobs_n_are_the_models_own_in_the_legacy_shape(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    data, inference = prepared(
        Completions, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 3}, ref
    )

    (reply,) = submit_all(*engine, inference)

    parsed = oai.Completion.model_validate(Completions.body(inference, reply, data))
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert len(logprobs.tokens) == 5
    assert "".join(logprobs.tokens) == parsed.choices[0].text
    check_completion_logprobs(hf, logprobs, 3)


def test_completions_logprobs_zero_still_gives_the_sampled_tokens_logprobs(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    data, inference = prepared(
        Completions, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 0}, ref
    )
    unasked, plain = prepared(Completions, {"prompt": PROMPT, "max_tokens": 4}, ref)

    reply, plain_reply = submit_all(*engine, inference, plain)

    logprobs = oai.Completion.model_validate(Completions.body(inference, reply, data))
    assert logprobs.choices[0].logprobs is not None
    check_completion_logprobs(hf, logprobs.choices[0].logprobs, 0)
    assert Completions.body(plain, plain_reply, unasked)["choices"][0]["logprobs"] is None


def test_each_request_in_a_batch_gets_the_number_of_alternatives_it_asked_for(
    ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    chat_body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True}
    one_data, one = prepared(ChatCompletions, {**chat_body, "top_logprobs": 3}, ref)
    five_data, five = prepared(
        Completions, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 5}, ref
    )
    none_data, none = prepared(
        ChatCompletions, {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}, ref
    )
    with running_engine(start=False) as (engine, channel):
        tickets = [engine.submit(r) for r in (one, five, none)]
        engine.start()
        for ticket in tickets:
            ticket.wait(120)
        assert engine.stats.prefills == 1  # one batch: the plan asks the model for top 5
        replies = [channel.wait_final(r.request_id) for r in (one, five, none)]

    chat = ChatCompletion.model_validate(ChatCompletions.body(one, replies[0], one_data))
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert chat.usage is not None
    assert len(logprobs.content) == chat.usage.completion_tokens == 6
    check_chat_content(hf, logprobs.content, 3)
    completion = oai.Completion.model_validate(Completions.body(five, replies[1], five_data))
    check_completion_logprobs(hf, completion.choices[0].logprobs, 5)
    plain = ChatCompletion.model_validate(ChatCompletions.body(none, replies[2], none_data))
    assert plain.choices[0].logprobs is None


def stream_chunks(
    api: type[Endpoint], inference: InferenceRequest, data: dict[str, Any], channel: MemoryChannel
) -> list[dict[str, Any]]:
    """The stream's chunks, made from the replies as the serving router makes them."""
    chunks = api.chunks(inference, data)
    assert chunks is not None
    out = list(chunks.opening())
    for reply in channel.replies[inference.request_id]:
        out += chunks.on(reply)
    return out


def test_streamed_logprobs_add_up_to_the_same_values(
    engine: tuple[Engine, MemoryChannel], ref: ModelRef, hf: tuple[Any, Any]
) -> None:
    served, channel = engine
    chat_body = {
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
    }
    chat_data, chat = prepared(ChatCompletions, chat_body, ref)
    text_data, text = prepared(
        Completions,
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "stream": True},
        ref,
    )

    submit_all(served, channel, chat, text)

    chat_chunks = [
        ChatCompletionChunk.model_validate(c)
        for c in stream_chunks(ChatCompletions, chat, chat_data, channel)
    ]
    content = [
        entry
        for chunk in chat_chunks
        for choice in chunk.choices
        if choice.logprobs is not None
        for entry in choice.logprobs.content or []
    ]
    assert len(content) == 8
    assert "".join(e.token for e in content).startswith(
        "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    )
    check_chat_content(hf, content, 2)

    # A stream chunk's `finish_reason` is null until the last (as in OpenAI's API), which
    # the SDK's strict Completion type refuses (its stream parser is lenient): the
    # chunk's logprobs are validated with the SDK's type.
    merged: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for chunk in stream_chunks(Completions, text, text_data, channel):
        assert chunk["object"] == "text_completion"
        shaped = chunk["choices"][0]["logprobs"]
        if shaped is not None:
            logprobs = oai.completion_choice.Logprobs.model_validate(shaped)
            for name, values in merged.items():
                values += getattr(logprobs, name) or []
    assert len(merged["tokens"]) == 8
    check_completion_logprobs(hf, oai.completion_choice.Logprobs(**merged), 2)
