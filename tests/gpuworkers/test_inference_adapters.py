"""LoRA adapters served on one shared base, full fine-tunes on their own, and the LRU of
loaded models under a memory budget."""

from __future__ import annotations

import threading
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobcontracts.inference import ModelRef, Reply
from tests.gpuworkers.inference_support import (
    adapter_dir,
    model_ref,
    request,
    run,
    running_engine,
    texts,
    varied_model_dir,
)
from tests.support.models import tiny_model_dir

PROMPT = "the weather is sunny the cat"


def peft_reference(adapters: dict[str, Any], prompt: str, max_new: int) -> dict[str, str]:
    """Each adapter's greedy text from PEFT's own mixed-batch `generate`, one at a time."""
    base = AutoModelForCausalLM.from_pretrained(varied_model_dir()).eval()
    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir())
    names = [name for name in adapters if name != "__base__"]
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    ids = tokenizer(prompt)["input_ids"]
    found = {}
    with torch.inference_mode():
        for name in adapters:
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=max_new,
                do_sample=False,
                adapter_names=[name],
            )
            found[name] = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    return found


def test_two_adapters_and_the_base_share_one_batch_and_one_loaded_base() -> None:
    folder = varied_model_dir()
    a, b = adapter_dir("a", 1), adapter_dir("b", 2)
    refs = {
        "__base__": model_ref(folder),
        "a": model_ref(folder, adapter=a),
        "b": model_ref(folder, adapter=b),
    }
    with running_engine(start=False) as (engine, channel):
        together = [request(ref, prompt=PROMPT, max_tokens=16) for ref in refs.values()]
        tickets = [engine.submit(r) for r in together]
        engine.start()
        for ticket in tickets:
            ticket.wait(60)
        batched = [channel.wait_final(r.request_id) for r in together]
        assert engine.stats.prefills == 1
        assert engine.stats.peak_rows == 3
        alone = [
            run(engine, channel, request(ref, prompt=PROMPT, max_tokens=16))[0]
            for ref in refs.values()
        ]

        assert engine.stats.loads == {f"file://{folder}": 1}
        assert engine.stats.adapter_loads == {f"file://{a}": 1, f"file://{b}": 1}

    batched_texts = {name: texts(r)[0] for name, r in zip(refs, batched, strict=True)}
    assert batched_texts == {name: texts(r)[0] for name, r in zip(refs, alone, strict=True)}
    assert len(set(batched_texts.values())) == 3  # each adapter really changes the output
    assert batched_texts == peft_reference({"__base__": None, "a": a, "b": b}, PROMPT, 16)


def test_a_full_fine_tune_loads_as_its_own_model() -> None:
    folder = varied_model_dir()
    own = tiny_model_dir("llama")  # stands in for a fully fine-tuned copy of the base
    full = ModelRef(
        id="ft:tiny:full",
        base_name="tiny",
        base_uri=f"file://{folder}",
        family="llama",
        task="causal_lm",
        context_length=256,
        weights_uri=f"file://{own}",
    )
    with running_engine() as (engine, channel):
        base_reply, full_reply = run(
            engine,
            channel,
            request(model_ref(folder), prompt=PROMPT, max_tokens=8),
            request(full, prompt=PROMPT, max_tokens=8),
        )
        assert engine.stats.loads == {f"file://{folder}": 1, f"file://{own}": 1}

    model = AutoModelForCausalLM.from_pretrained(own).eval()
    tokenizer = AutoTokenizer.from_pretrained(own)
    ids = tokenizer(PROMPT)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert texts(full_reply) == [tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)]
    assert texts(full_reply) != texts(base_reply)


def _mb(folder: Any) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def test_the_least_recently_used_idle_model_is_evicted_when_the_budget_is_full() -> None:
    llama, gpt2 = varied_model_dir("llama"), varied_model_dir("gpt2")
    budget = max(_mb(llama), _mb(gpt2)) * 1.3  # room for one of them, not both
    ref_llama, ref_gpt2 = model_ref(llama), model_ref(gpt2)
    with running_engine(memory_budget_mb=budget) as (engine, channel):
        first = run(engine, channel, request(ref_llama, max_tokens=4))[0]
        run(engine, channel, request(ref_gpt2, max_tokens=4))
        assert engine.stats.evictions == [f"file://{llama}"]
        again = run(engine, channel, request(ref_llama, max_tokens=4))[0]
        assert engine.stats.evictions == [f"file://{llama}", f"file://{gpt2}"]
        assert engine.stats.loads == {f"file://{llama}": 2, f"file://{gpt2}": 1}
        assert [k.uri for k in engine.loaded()] == [f"file://{llama}"]
    assert texts(again) == texts(first)


def test_a_model_with_requests_in_flight_is_not_evicted_the_next_one_waits() -> None:
    llama, gpt2 = varied_model_dir("llama"), varied_model_dir("gpt2")
    budget = max(_mb(llama), _mb(gpt2)) * 1.3
    order: list[tuple[str, str]] = []
    lock = threading.Lock()
    with running_engine(memory_budget_mb=budget) as (engine, channel):
        long = request(model_ref(llama), max_tokens=150, stream=True)
        other = request(model_ref(gpt2), max_tokens=4)
        streaming = threading.Event()

        def record(reply: Reply) -> None:
            with lock:
                order.append((reply.request_id, reply.type))
            if reply.request_id == long.request_id and reply.type == "delta":
                streaming.set()

        channel.listeners.append(record)
        long_ticket = engine.submit(long)
        assert streaming.wait(30)
        other_ticket = engine.submit(other)
        long_ticket.wait(60)
        other_ticket.wait(60)
        assert engine.stats.evictions == [f"file://{llama}"]
    assert order.index((long.request_id, "done")) < order.index((other.request_id, "start"))
    assert channel.wait_final(other.request_id).type == "done"


def test_a_model_larger_than_the_budget_is_refused_with_503() -> None:
    with running_engine(memory_budget_mb=0.01) as (engine, channel):
        req = request(model_ref(varied_model_dir()), max_tokens=4)
        ticket = engine.submit(req)
        assert ticket.wait(60) is None
        reply = channel.wait_final(req.request_id)
    assert reply.type == "error"
    assert reply.data["status"] == 503
    assert reply.data["code"] == "insufficient_memory"
    assert ticket.outcome == "refused"
