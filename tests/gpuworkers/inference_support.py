"""Models, adapters and requests for the inference engine's tests.

The tiny test models are randomly initialised with small weights, so greedy
decoding repeats one token and would hide batching mistakes. `varied_model_dir`
re-draws the weights larger (seeded), so every prompt gets a different, varied
continuation; the LoRA adapters are perturbed the same way so that each changes
the output. All are built once per machine and cached like tests/support/models.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpuworkers.inference.config import Settings
from gpuworkers.inference.scheduler import Engine
from gpuworkers.replies import MemoryChannel
from jobcontracts.inference import InferenceRequest, ModelRef, Params, Reply
from tests.support.models import CACHE, minilm_dir, tiny_model_dir

_VERSION = "1"  # bump to rebuild the derived models


def _cached(name: str, build: Any, *inputs: Path) -> Path:
    digest = hashlib.sha256((_VERSION + "".join(str(p) for p in inputs)).encode()).hexdigest()[:12]
    out = CACHE / f"{name}-{digest}"
    if (out / ".complete").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / ".complete").touch()
    with contextlib.suppress(OSError):
        tmp.rename(out)
    return out


def varied_model_dir(family: str = "llama") -> Path:
    """The tiny `family` model with larger random weights: varied greedy output."""
    source = tiny_model_dir(family)

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source)
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name and "ln_" not in name:
                    param.normal_(0, 0.15, generator=generator)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        shutil.copy(source / "atelier.json", out / "atelier.json")

    return _cached(f"{family}-varied", build, source)


def adapter_dir(name: str, seed: int, family: str = "llama") -> Path:
    """A LoRA adapter for `varied_model_dir(family)` whose weights change its output."""
    base = varied_model_dir(family)

    def build(out: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"),
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.normal_(0, 0.5, generator=generator)
        model.save_pretrained(out)

    return _cached(f"{family}-adapter-{name}-{seed}", build, base)


def classifier_dir() -> Path:
    """A MiniLM sequence classifier (full fine-tune layout) with three labels."""
    source = minilm_dir()

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(0)
        labels = ["negative", "neutral", "positive"]
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=3,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)

    return _cached("minilm-classifier", build, source)


def lora_classifier_dir(name: str, seed: int, labels: int = 2) -> Path:
    """A LoRA classifier on MiniLM (adapter + its own head), as the training engine saves one."""
    source = minilm_dir()

    def build(out: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=labels)
        config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = get_peft_model(base, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name or "modules_to_save" in param_name:
                    param.normal_(0, 0.2, generator=generator)
        model.save_pretrained(out)

    return _cached(f"minilm-lora-classifier-{name}-{seed}", build, source)


def model_ref(
    folder: Path,
    *,
    task: str = "causal_lm",
    adapter: Path | None = None,
    name: str = "tiny",
    labels: tuple[str, ...] = (),
    context_length: int = 256,
) -> ModelRef:
    return ModelRef(
        id=f"ft:{name}:{adapter.name}" if adapter else name,
        base_name=name,
        base_uri=f"file://{folder}",
        family="llama",
        task=task,
        context_length=context_length,
        adapter_uri=f"file://{adapter}" if adapter else None,
        labels=labels,
    )


def request(
    model: ModelRef,
    *,
    kind: str = "completion",
    prompt: str | None = "the cat sat on",
    messages: list[dict[str, str]] | None = None,
    inputs: tuple[str, ...] | None = None,
    stream: bool = False,
    deadline: float = 0.0,
    **params: Any,
) -> InferenceRequest:
    params.setdefault("temperature", 0.0)
    if inputs is None:
        inputs = (prompt,) if prompt is not None and kind == "completion" else ()
    return InferenceRequest(
        request_id=f"req-{uuid.uuid4().hex[:12]}",
        organization_id="org-test",
        api_key_id="key-test",
        kind=kind,
        model=model,
        params=Params(**params),
        messages=tuple(messages) if messages is not None else None,
        inputs=inputs,
        stream=stream,
        deadline=deadline,
        sent_at=time.time(),
    )


@contextlib.contextmanager
def running_engine(**settings: Any) -> Iterator[tuple[Engine, MemoryChannel]]:
    channel = MemoryChannel()
    start = settings.pop("start", True)
    settings.setdefault("torch_threads", 1)
    settings.setdefault("cancel_check_ms", 1.0)
    engine = Engine(Settings(**settings), channel, start=start)
    try:
        yield engine, channel
    finally:
        engine.close()


def run(engine: Engine, channel: MemoryChannel, *requests: InferenceRequest) -> list[Reply]:
    """Submit all at once (so they share batches), wait, return each final reply."""
    tickets = [engine.submit(r) for r in requests]
    for ticket in tickets:
        ticket.wait(120)
    return [channel.wait_final(r.request_id) for r in requests]


def texts(reply: Reply) -> list[str]:
    assert reply.type == "done", reply
    return [c["text"] for c in reply.data["choices"]]


def deltas(channel: MemoryChannel, request_id: str, index: int = 0) -> str:
    return "".join(
        r.data["text"]
        for r in channel.replies[request_id]
        if r.type == "delta" and r.data["index"] == index
    )
