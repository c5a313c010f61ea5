"""Loading models and LoRA adapters for serving, and routing adapters per batch row.

Everything loads with `from_pretrained(local_dir, use_safetensors=True)` (adapters:
PEFT's `load_adapter` from a directory holding `adapter_model.safetensors`), never
from a pickle: `gpuworkers.safeload` refuses a directory holding one, as training
does. A model in object storage is first copied to a local cache directory (keyed
by URI; models and adapters are immutable once written).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpuworkers import safeload, storage
from gpuworkers.compression import quantized
from gpuworkers.inference.config import Settings

#: Model kinds the engine serves.
CAUSAL = "causal"
CLASSIFIER = "classifier"
ENCODER = "encoder"

#: End-of-turn markers of common chat templates: a chat reply stops at them.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_INT_ITEMSIZE = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelError(Exception):
    """A model or adapter that cannot be served; becomes an error reply."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ModelKey:
    kind: str  # CAUSAL | CLASSIFIER | ENCODER
    uri: str  # the weights loaded: a base model, or a full fine-tune's own directory
    num_labels: int = 0  # classifiers loaded from a base for a LoRA head


def adapter_name(uri: str) -> str:
    # PEFT adapter names become module attribute names: letters, digits, underscores.
    return "a" + hashlib.sha256(uri.encode()).hexdigest()[:20]


def local_dir(uri: str, cache_dir: Path) -> Path:
    """A local directory holding the objects under `uri` (copied there once if remote)."""
    try:
        path = storage.local_path(uri)
    except storage.StorageError as error:
        raise ModelError(400, "invalid_model_uri", str(error)) from None
    if path is not None:
        if not path.is_dir():
            raise ModelError(503, "model_unavailable", f"model files not found: {uri}")
        return path
    final = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:32]
    if (final / ".complete").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="download-", dir=cache_dir))
    try:
        storage.download_dir(uri, target)
    except FileNotFoundError:
        shutil.rmtree(target, ignore_errors=True)
        raise ModelError(503, "model_unavailable", f"nothing found at {uri}") from None
    (target / ".complete").touch()
    try:
        target.rename(final)
    except OSError:  # another thread or worker on this host finished the same copy first
        shutil.rmtree(target, ignore_errors=True)
    return final


def estimate_bytes(folder: Path, itemsize: int) -> int:
    """Bytes the weights under `folder` take once loaded with floats of `itemsize`,
    from the safetensors headers (no tensor is read)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            dtype = info["dtype"]
            size = itemsize if dtype in _ITEMSIZE else _INT_ITEMSIZE.get(dtype, 4)
            total += numel * size
    return total


def pick_device(settings: Settings) -> torch.device:
    if settings.device:
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    if settings.dtype:
        value = getattr(torch, settings.dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"INFERENCE_DTYPE: unknown torch dtype {settings.dtype!r}")
        return value
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def memory_budget(settings: Settings, device: torch.device) -> int:
    if settings.memory_budget_mb is not None:
        return int(settings.memory_budget_mb * 2**20)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.75)
    return 4096 * 2**20


class AdapterRouter:
    """Gives every LoRA layer the adapter of each batch row (`"__base__"`: none).

    PEFT's mixed-adapter batches (`model(..., adapter_names=[...])`) register a
    hook on every LoRA layer for each call and check each name against every
    layer; a decode loop calls the model once per token, so the hooks are
    registered once here and read the current rows' names from `names`.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self._hooked: set[int] = set()
        self._handles: list[Any] = []

    def install(self, model: Any) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        for module in model.modules():
            if isinstance(module, LoraLayer | AuxiliaryTrainingWrapper) and (
                id(module) not in self._hooked
            ):
                layer: Any = module
                self._hooked.add(id(module))
                self._handles.append(layer.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(
        self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs


@dataclass
class Adapter:
    uri: str
    name: str
    nbytes: int
    refs: int = 0


@dataclass
class Loaded:
    key: ModelKey
    model: Any
    tokenizer: Any
    device: torch.device
    nbytes: int
    load_ms: float
    context_length: int
    pad_id: int
    eos_ids: frozenset[int] = frozenset()
    turn_ids: frozenset[int] = frozenset()
    labels: tuple[str, ...] = ()
    pooling: str = "mean"
    normalize: bool = True
    max_input_tokens: int = 512
    #: PEFT wrapper of `model`, once an adapter is attached (LoRA layers are
    #: injected into `model` itself, which is still what the engine calls).
    peft: Any = None
    router: AdapterRouter | None = None
    adapters: OrderedDict[str, Adapter] = field(default_factory=OrderedDict)
    refs: int = 0

    @property
    def total_bytes(self) -> int:
        return self.nbytes + sum(a.nbytes for a in self.adapters.values())


def load(key: ModelKey, folder: Path, *, device: torch.device, dtype: torch.dtype) -> Loaded:
    """Load a model directory for serving (on the loader thread)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    started = time.perf_counter()
    try:
        safeload.require_safetensors(folder)
    except safeload.UnsafeWeights as error:
        raise ModelError(503, "model_unavailable", str(error)) from None
    kwargs: dict[str, Any] = {"dtype": dtype, **safeload.pretrained_kwargs()}
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if quantized.is_quantized(folder):
        # A compression job's quantized artifact: its own modules, from its own manifest.
        try:
            model: Any = quantized.load_model(folder, kind=key.kind, device=device, dtype=dtype)
        except quantized.QuantizedFormatError as error:
            raise ModelError(503, "model_unavailable", str(error)) from None
        if key.kind == CLASSIFIER and key.num_labels not in (0, model.config.num_labels):
            message = f"the quantized classifier has {model.config.num_labels} labels"
            raise ModelError(400, "model_unavailable", message + ", and takes no new head")
        if key.kind == CLASSIFIER and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id  # as from_pretrained is told
    elif key.kind == CAUSAL:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    elif key.kind == CLASSIFIER:
        if key.num_labels:
            kwargs["num_labels"] = key.num_labels
        if tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), **kwargs)
    else:
        model = AutoModel.from_pretrained(str(folder), **kwargs)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    config = model.config
    nbytes = quantized.resident_bytes(model)
    limits = [
        value
        for value in (getattr(config, n, None) for n in ("max_position_embeddings", "n_positions"))
        if isinstance(value, int) and value > 0
    ]
    context = min(limits) if limits else 2048
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    loaded = Loaded(
        key=key,
        model=model,
        tokenizer=tokenizer,
        device=device,
        nbytes=nbytes,
        load_ms=0.0,
        context_length=context,
        pad_id=int(pad_id),
    )
    if key.kind == CAUSAL:
        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), config, tokenizer):
            value = getattr(source, "eos_token_id", None)
            eos.update([value] if isinstance(value, int) else list(value or ()))
        loaded.eos_ids = frozenset(eos)
        vocab = tokenizer.get_vocab()
        loaded.turn_ids = frozenset(eos | {vocab[t] for t in TURN_END_TOKENS if t in vocab})
    if key.kind == CLASSIFIER:
        id2label = getattr(config, "id2label", None) or {}
        loaded.labels = tuple(str(id2label[i]) for i in sorted(id2label, key=int))
    _pooling(loaded, folder)
    loaded.load_ms = (time.perf_counter() - started) * 1000
    return loaded


def _pooling(loaded: Loaded, folder: Path) -> None:
    """Pooling as sentence-transformers configures it (modules.json, 1_Pooling/)."""
    loaded.max_input_tokens = loaded.context_length
    modules_path = folder / "modules.json"
    if loaded.key.kind == CAUSAL:
        loaded.pooling, loaded.normalize = "mean", True
    if not modules_path.exists():
        return
    modules = json.loads(modules_path.read_text())
    types = [str(m.get("type", "")) for m in modules]
    loaded.normalize = any(t.endswith(".Normalize") for t in types)
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            pooling_config = folder / str(module.get("path", "")) / "config.json"
            if pooling_config.exists():
                options = json.loads(pooling_config.read_text())
                for mode, name in (
                    ("pooling_mode_cls_token", "cls"),
                    ("pooling_mode_max_tokens", "max"),
                    ("pooling_mode_lasttoken", "last"),
                    ("pooling_mode_mean_tokens", "mean"),
                ):
                    if options.get(mode):
                        loaded.pooling = name
    st_config = folder / "sentence_bert_config.json"
    if st_config.exists():
        max_len = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(max_len, int) and max_len > 0:
            loaded.max_input_tokens = min(max_len, loaded.context_length)


#: Families whose modeling code is imported when a worker starts (transformers imports lazily).
PRELOAD_FAMILIES = ("llama", "gpt2", "bert", "qwen2", "mistral")


def preload_model_code() -> None:
    import contextlib
    import importlib

    import peft  # noqa: F401 - the import is the point
    from transformers.utils import logging as transformers_logging

    # Progress bars for loading weights are noise in a worker's log.
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    for family in PRELOAD_FAMILIES:
        with contextlib.suppress(ImportError):
            importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def attach_adapter(loaded: Loaded, uri: str, folder: Path) -> Adapter:
    """Load a LoRA adapter onto the already-loaded base (on the scheduler thread,
    between forwards: PEFT injects layers into the model)."""
    from peft import PeftModel

    try:
        safeload.require_safetensors(
            folder, what="the adapter", weights="adapter_model.safetensors"
        )
    except safeload.UnsafeWeights as error:
        raise ModelError(503, "model_unavailable", str(error)) from None
    name = adapter_name(uri)
    device = str(loaded.device)
    try:
        if loaded.peft is None:
            loaded.peft = PeftModel.from_pretrained(
                loaded.model,
                str(folder),
                adapter_name=name,
                is_trainable=False,
                torch_device=device,
            )
        else:
            loaded.peft.load_adapter(
                str(folder), adapter_name=name, is_trainable=False, torch_device=device
            )
    except (ValueError, KeyError, RuntimeError) as error:
        message = f"the adapter does not fit its base: {error}"
        raise ModelError(500, "adapter_load_failed", message) from error
    loaded.peft.eval()
    if loaded.router is None:
        loaded.router = AdapterRouter()
    loaded.router.install(loaded.model)
    nbytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    adapter = Adapter(uri=uri, name=name, nbytes=nbytes)
    loaded.adapters[uri] = adapter
    return adapter


def detach_adapter(loaded: Loaded, uri: str) -> None:
    adapter = loaded.adapters.pop(uri)
    if loaded.peft is not None:
        loaded.peft.delete_adapter(adapter.name)
