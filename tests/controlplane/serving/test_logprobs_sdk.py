"""Log-probabilities with the official `openai` SDK through real processes: `atelier web`
and `atelier worker inference`. Chat's `logprobs`/`top_logprobs` and completions'
`logprobs: N`, plain and streamed, equal log_softmax of the model's own logits at each
step (the checks are test_logprobs.py's, the in-process version of this test)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.completion_choice import Logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from controlplane.modelregistry.models import BaseModel
from tests.controlplane.serving.test_logprobs import (
    MESSAGES,
    PROMPT,
    check_chat_content,
    check_completion_logprobs,
)
from tests.gpuworkers.inference_support import varied_model_dir
from tests.support.jobs import purge_broker
from tests.support.people import Person
from tests.support.processes import asgi_server, worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ENV = {
    "INFERENCE_SILENCE_SECONDS": "3",
    "INFERENCE_HEARTBEAT_SECONDS": "1",
    "TORCH_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
MODEL = "atelier-varied-llama"


@pytest.fixture
def client(alice: Person, tmp_path: Path) -> Iterator[openai.OpenAI]:
    purge_broker()
    BaseModel.objects.create(
        id=MODEL,
        family="llama",
        tasks=["causal_lm"],
        methods=["supervised"],
        adapters=["lora", "full"],
        context_length=256,
        uri=varied_model_dir().as_uri(),
        price_per_1k_training_tokens=Decimal("0.0008"),
    )
    with (
        worker("control", tmp_path / "control", **ENV),
        worker("inference", tmp_path / "inference", **ENV),
        asgi_server(tmp_path / "web", **ENV) as server,
    ):
        yield openai.OpenAI(
            api_key=alice.key, base_url=server.url + "/v1", max_retries=0, timeout=120
        )
    purge_broker()


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    folder = varied_model_dir()
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def test_the_sdk_gets_the_models_logprobs_for_chat_and_completions_streamed_or_not(
    client: openai.OpenAI, hf: tuple[Any, Any]
) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert len(logprobs.content) == 6
    check_chat_content(hf, logprobs.content, 3)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = [
        entry
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs is not None
        for entry in choice.logprobs.content or []
    ]
    assert len(streamed) == 6
    check_chat_content(hf, streamed, 2)

    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3
    )
    assert completion.choices[0].logprobs is not None
    check_completion_logprobs(hf, completion.choices[0].logprobs, 3)

    merged: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, stream=True
    ):
        shown = chunk.choices[0].logprobs
        if shown is not None:
            for name, values in merged.items():
                values += getattr(shown, name) or []
    assert len(merged["tokens"]) == 5
    check_completion_logprobs(hf, Logprobs(**merged), 2)
