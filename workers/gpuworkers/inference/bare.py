"""The same models called in-process without the platform: the benchmark's baseline.

    bare = load(Path("model-dir"))
    result = generate(bare, ["the cat sat on"] * 32, max_new_tokens=32)
    result.tokens / result.seconds  # tokens per second

Loaded as the engine loads them (`from_pretrained(..., use_safetensors=True)`,
same device and dtype rules), then plain `model.generate` (greedy, left-padded
batch) or one forward for embeddings, with nothing of the platform around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpuworkers import safeload
from gpuworkers.inference.config import Settings
from gpuworkers.inference.models import pick_device, pick_dtype


@dataclass
class Bare:
    model: Any
    tokenizer: Any
    device: torch.device


@dataclass
class Generated:
    texts: list[str]
    #: Tokens generated (all rows, up to each row's end).
    tokens: int
    seconds: float


def load(folder: Path, *, task: str = "causal_lm", settings: Settings | None = None) -> Bare:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    settings = settings or Settings.from_env()
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    model_class: Any = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    safeload.require_safetensors(folder)
    model = model_class.from_pretrained(str(folder), dtype=dtype, **safeload.pretrained_kwargs())
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Bare(model, tokenizer, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(bare: Bare, prompts: list[str], *, max_new_tokens: int) -> Generated:
    """Greedy `model.generate` of all prompts as one batch, timed from tokenizing to text."""
    tokenizer = bare.tokenizer
    _sync(bare.device)
    started = time.perf_counter()
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(bare.device)
    with torch.inference_mode():
        out = bare.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    _sync(bare.device)
    seconds = time.perf_counter() - started
    eos = bare.model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    tokens = 0
    for row in new:
        # generate pads finished rows: count each row up to (and with) its end token.
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens += end
    return Generated(texts=texts, tokens=tokens, seconds=seconds)


def embed(bare: Bare, texts: list[str], *, max_length: int = 256) -> tuple[torch.Tensor, float]:
    """Mean-pooled, normalised embeddings in one forward, and the seconds it took."""
    _sync(bare.device)
    started = time.perf_counter()
    bare.tokenizer.padding_side = "right"
    batch = bare.tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
    ).to(bare.device)
    with torch.inference_mode():
        hidden = bare.model(**batch).last_hidden_state.float()
    weights = batch["attention_mask"][..., None].float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    vectors = torch.nn.functional.normalize(pooled, dim=-1).cpu()
    _sync(bare.device)
    return vectors, time.perf_counter() - started
