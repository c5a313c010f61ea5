"""Loading the base model (full or LoRA, causal LM or classifier) and saving weights.

Everything goes through the ordinary `from_pretrained(local_dir)`: a base model or
checkpoint on S3 is first copied to a local directory. Safetensors only, as in
inference: `gpuworkers.safeload` refuses a directory holding a pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging
from transformers.utils.import_utils import is_flash_attn_2_available

from gpuworkers import safeload, storage
from gpuworkers.training import objectives
from gpuworkers.training.errors import TrainingError
from jobcontracts.training import TrainingSpec

# Progress bars for loading and writing shards are noise in a worker's log.
transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

#: LoRA targets when the spec names none: the family's attention projections.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
}
#: Files PEFT writes that are not weights, config or tokenizer (a model card).
_NOT_ARTIFACT = ("README.md",)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    #: Frozen base model for full-fine-tune DPO (LoRA uses the adapter-less base).
    reference: Any | None
    kind: str  # "full" | "lora"
    family: str
    max_len: int


def local_dir(uri: str, *, what: str, cache: bool) -> Path:
    """A local directory holding the objects under `uri` (copied there if remote)."""
    path = storage.local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise TrainingError(f"{what}_unavailable", f"{what.replace('_', ' ')} not found: {uri}")
        return path
    root = Path(os.environ.get("GPU_WORKER_CACHE_DIR") or Path(tempfile.gettempdir()) / "atelier")
    # Base models are immutable: keep them between jobs, keyed by URI. Checkpoints
    # are downloaded for one attempt and removed after it.
    final = root / "models" / hashlib.sha256(uri.encode()).hexdigest()[:24] if cache else None
    if final is not None and (final / ".complete").exists():
        return final
    target = Path(tempfile.mkdtemp(prefix="download-", dir=_mkdir(root / "downloads")))
    try:
        storage.download_dir(uri, target)
    except FileNotFoundError:
        shutil.rmtree(target, ignore_errors=True)
        raise TrainingError(f"{what}_unavailable", f"nothing found at {uri}") from None
    if final is None:
        return target
    (target / ".complete").touch()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        target.rename(final)
    except OSError:  # another worker on this host finished the same download first
        shutil.rmtree(target, ignore_errors=True)
    return final


def _require_safetensors(folder: Path, what: str) -> None:
    try:
        safeload.require_safetensors(folder, what=what)
    except safeload.UnsafeWeights as error:
        raise TrainingError("unsafe_weights", str(error)) from None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(
    spec: TrainingSpec, *, base_dir: Path, resume_dir: Path | None, device: torch.device
) -> Loaded:
    _require_safetensors(base_dir, "the base model")
    if resume_dir is not None:
        _require_safetensors(resume_dir, "the checkpoint")
    torch.manual_seed(spec.hyperparameters.seed)  # new heads and LoRA matrices start the same
    tokenizer = AutoTokenizer.from_pretrained(resume_dir or base_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TrainingError("unsupported_model", "the tokenizer has no pad or end token")
        tokenizer.pad_token = tokenizer.eos_token
    lora = spec.adapter is not None
    # bf16 base weights under LoRA on a GPU that has it (PEFT keeps the adapter in
    # fp32); full fine-tunes keep fp32 master weights and train under autocast.
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if lora and bf16 else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, **safeload.pretrained_kwargs()}
    if spec.task == "classification":
        model_class: Any = AutoModelForSequenceClassification
        kwargs.update(
            num_labels=len(spec.labels),
            id2label=dict(enumerate(spec.labels)),
            label2id={name: i for i, name in enumerate(spec.labels)},
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        model_class = AutoModelForCausalLM
        if spec.hyperparameters.packing and device.type == "cuda" and is_flash_attn_2_available():
            # Packed rows go through flash attention's varlen path (no mask, no padding).
            kwargs["attn_implementation"] = "flash_attention_2"
    source = resume_dir if resume_dir is not None and not lora else base_dir
    model = model_class.from_pretrained(str(source), **kwargs)
    family = str(getattr(model.config, "model_type", "") or spec.base_model.family)
    if spec.task != "classification":
        objectives.select_logits(model)  # before PEFT wraps it
    if spec.adapter is not None:
        if resume_dir is not None:
            model = PeftModel.from_pretrained(model, str(resume_dir), is_trainable=True)
            for config in model.peft_config.values():
                config.base_model_name_or_path = str(base_dir)  # local, never a hub lookup
        else:
            model = get_peft_model(model, _lora_config(spec, family))
    reference = None
    if spec.method == "dpo" and not lora:
        # The reference is always the base model, also when resuming a checkpoint.
        reference = model_class.from_pretrained(str(base_dir), **kwargs)
        reference.requires_grad_(False)
        reference.eval()
        reference.to(device)
    model.to(device)
    model.train()
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        reference=reference,
        kind="lora" if lora else "full",
        family=family,
        max_len=_max_len(spec, model, tokenizer),
    )


def _lora_config(spec: TrainingSpec, family: str) -> LoraConfig:
    assert spec.adapter is not None
    targets = spec.adapter.target_modules or DEFAULT_TARGETS.get(family)
    if not targets:
        raise TrainingError(
            "invalid_adapter",
            f"no default LoRA target modules for model family {family!r}: name target_modules",
        )
    return LoraConfig(
        r=spec.adapter.r,
        lora_alpha=spec.adapter.alpha,
        lora_dropout=spec.adapter.dropout,
        target_modules=list(targets),
        task_type=TaskType.SEQ_CLS if spec.task == "classification" else TaskType.CAUSAL_LM,
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )


def _max_len(spec: TrainingSpec, model: Any, tokenizer: Any) -> int:
    limits = [spec.hyperparameters.max_seq_len]
    if spec.base_model.context_length > 0:
        limits.append(spec.base_model.context_length)
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    if 0 < int(getattr(tokenizer, "model_max_length", 0) or 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    return max(2, min(limits))


def unwrap(model: Any) -> Any:
    """The model under a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_weights(model: Any, tokenizer: Any, out: Path, *, base_name: str) -> None:
    """Weights (safetensors) + config + tokenizer, loadable with `from_pretrained(out)`
    (full) or `PeftModel.from_pretrained(base, out)` (LoRA)."""
    model = unwrap(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    for name in _NOT_ARTIFACT:
        (out / name).unlink(missing_ok=True)
    adapter_config = out / "adapter_config.json"
    if adapter_config.exists():
        # Name the base model, not this worker's local copy of it (PEFT read that
        # copy's config while saving; rewriting afterwards keeps it off the hub).
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base_name
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))


def write_manifest(out: Path, *, spec: TrainingSpec, kind: str, family: str) -> None:
    manifest = {
        "task": spec.task,
        "method": spec.method,
        "artifact_kind": kind,
        "base_model": spec.base_model.name,
        "family": family,
        "labels": list(spec.labels),
        "job_id": spec.job_id,
    }
    (out / "atelier.json").write_text(json.dumps(manifest, indent=2))


#: Families whose modeling code is imported ahead of the first job (see `preload_model_code`).
PRELOAD_FAMILIES = ("llama", "gpt2", "bert", "qwen2", "mistral")


def preload_model_code() -> None:
    """Import the modeling modules `from_pretrained` would import lazily on first use."""
    import contextlib
    import importlib

    for family in PRELOAD_FAMILIES:
        with contextlib.suppress(ImportError):
            importlib.import_module(f"transformers.models.{family}.modeling_{family}")
