"""Turning an `InferenceRequest` into token ids, on the Celery task's own thread.

Tokenizing (and rendering a chat template) happens before the request reaches
the scheduler, so the thread that owns the models spends its time in forwards.
Each model directory has its own tokenizer instance for this, used under a lock
(a fast tokenizer must not be borrowed by two threads at once); the scheduler
decodes with the model's separate instance.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuworkers.inference.config import Settings
from gpuworkers.inference.models import CAUSAL, CLASSIFIER, ENCODER, ModelError, ModelKey, local_dir
from jobcontracts.inference import InferenceRequest


@dataclass
class Prepared:
    key: ModelKey
    adapter_uri: str | None
    #: Generation: one prompt per completion prompt (chat: one); encoding: one per input.
    prompts: list[list[int]]
    prompt_tokens: int


@dataclass
class TokenizerEntry:
    tokenizer: Any
    lock: threading.Lock
    #: Longer inputs are cut here when encoding (sentence-transformers' max_seq_length).
    max_input_tokens: int
    context_length: int
    #: Width of the model's hidden state (embedding size), 0 when unknown.
    hidden_size: int = 0


def model_key(request: InferenceRequest) -> ModelKey:
    ref = request.model
    uri = ref.weights_uri or ref.base_uri
    if request.kind in ("chat", "completion"):
        if ref.task != "causal_lm":
            raise ModelError(400, "unsupported_model", f"{ref.id} does not generate text")
        return ModelKey(CAUSAL, uri)
    if request.kind == "embedding":
        if ref.task == "embeddings":
            return ModelKey(ENCODER, uri)
        if ref.task == "causal_lm":
            return ModelKey(CAUSAL, uri)
        raise ModelError(400, "unsupported_model", f"{ref.id} does not make embeddings")
    if ref.task != "classification":
        raise ModelError(400, "unsupported_model", f"{ref.id} is not a classifier")
    # A LoRA classifier is loaded on a base that has no head yet: it needs the label count.
    labels = len(ref.labels) if ref.adapter_uri else 0
    return ModelKey(CLASSIFIER, uri, labels)


class Tokenizers:
    """Tokenizers (and local directories) of the models requests name, loaded once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._entries: dict[str, TokenizerEntry] = {}
        self._dirs: dict[str, Path] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def folder(self, uri: str) -> Path:
        """The local directory of `uri`; a remote one is copied once, whichever thread asks."""
        found = self._dirs.get(uri)
        if found is not None:
            return found
        with self._lock:
            lock = self._locks.setdefault(uri, threading.Lock())
        with lock:
            found = self._dirs.get(uri)
            if found is None:
                found = local_dir(uri, self.settings.cache_dir)
                self._dirs[uri] = found
            return found

    def get(self, uri: str) -> TokenizerEntry:
        entry = self._entries.get(uri)
        if entry is not None:
            return entry
        folder = self.folder(uri)
        with self._lock:
            lock = self._locks.setdefault("tokenizer:" + uri, threading.Lock())
        with lock:
            entry = self._entries.get(uri)
            if entry is None:
                entry = _load_tokenizer(folder)
                self._entries[uri] = entry
            return entry


def _load_tokenizer(folder: Path) -> TokenizerEntry:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise ModelError(503, "model_unavailable", f"cannot load the tokenizer: {error}") from None
    context = 2048
    hidden = 0
    config_path = folder / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        for name in ("max_position_embeddings", "n_positions"):
            value = config.get(name)
            if isinstance(value, int) and value > 0:
                context = value
                break
        for name in ("hidden_size", "n_embd", "d_model"):
            value = config.get(name)
            if isinstance(value, int) and value > 0:
                hidden = value
                break
    max_input = context
    st_config = folder / "sentence_bert_config.json"
    if st_config.exists():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            max_input = min(max_input, value)
    return TokenizerEntry(tokenizer, threading.Lock(), max_input, context, hidden)


def prepare(request: InferenceRequest, tokenizers: Tokenizers) -> Prepared:
    """Token ids of a request's prompts or inputs; ModelError (400) for bad input."""
    key = model_key(request)
    entry = tokenizers.get(key.uri)
    tokenizer = entry.tokenizer
    ref = request.model
    context = min(entry.context_length, ref.context_length or entry.context_length)
    if request.kind in ("chat", "completion"):
        with entry.lock:
            if request.kind == "chat":
                prompts = [_chat_ids(tokenizer, list(request.messages or ()))]
            else:
                if not request.inputs:
                    raise ModelError(400, "invalid_prompt", "the prompt is empty")
                prompts = [list(tokenizer(text)["input_ids"]) for text in request.inputs]
        for ids in prompts:
            if not ids:
                raise ModelError(400, "invalid_prompt", "the prompt has no tokens")
            if len(ids) >= context:
                raise ModelError(
                    400,
                    "context_length_exceeded",
                    f"the prompt has {len(ids)} tokens; {ref.id} reads at most {context} "
                    "including the completion: shorten it",
                )
    else:
        if not request.inputs:
            raise ModelError(400, "invalid_input", "no input to encode")
        dimensions = request.params.dimensions
        if (
            request.kind == "embedding"
            and dimensions is not None
            and (dimensions < 1 or (entry.hidden_size and dimensions > entry.hidden_size))
        ):
            raise ModelError(
                400,
                "invalid_dimensions",
                f"dimensions must be between 1 and {entry.hidden_size} for {ref.id}",
            )
        limit = min(entry.max_input_tokens, context)
        with entry.lock:
            encoded = tokenizer(list(request.inputs), truncation=True, max_length=limit)
        prompts = [list(ids) for ids in encoded["input_ids"]]
    return Prepared(
        key=key,
        adapter_uri=ref.adapter_uri,
        prompts=prompts,
        prompt_tokens=sum(len(ids) for ids in prompts),
    )


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if not messages:
        raise ModelError(400, "invalid_messages", "messages is empty")
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # Jinja raises its own errors for what a template refuses
            message = f"the chat template refused: {error}"
            raise ModelError(400, "invalid_messages", message) from error
        # The template writes any special tokens itself.
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])
