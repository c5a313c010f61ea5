"""The `quantize` method: the source's weights stored in fewer bits, nothing retrained.

Option `weights` (jobcontracts.compression.QUANTIZE_WEIGHTS):
- "int8" (default, any worker): every Linear (and GPT-2 Conv1D) and the token-embedding
  table become symmetric int8 with a float32 scale per output channel (per row). The
  embedding table matters: it is half of MiniLM's parameters, and without it the file
  is not even 2x smaller. A tied output head (GPT-2, tied Llama) stays tied to it.
- "bf16" (CUDA workers): every floating tensor cast to bfloat16, a plain HF directory.
- "fp8" (CUDA workers): like int8 with float8_e4m3fn values, served by `torch._scaled_mm`.

The format and the loader are in `quantized.py`; this module loads the source, picks
what the option asks for and copies the tokenizer and sentence-transformers files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Final

from gpuworkers import safeload
from gpuworkers.compression import quantized
from gpuworkers.compression.context import CompressionError, Work
from jobcontracts.compression import QUANTIZATION_FILE, QUANTIZE_WEIGHTS

DEFAULT_WEIGHTS: Final = "int8"
#: Weight formats whose kernels need a CUDA worker.
CUDA_ONLY: Final = ("bf16", "fp8")
#: Model kind (quantized.KINDS) of each compression task.
KIND_OF_TASK: Final = {
    "causal_lm": quantized.CAUSAL,
    "embeddings": quantized.ENCODER,
    "classification": quantized.CLASSIFIER,
}
#: Written by `quantized.save`; never copied from the source.
_WRITTEN: Final = frozenset(
    {"config.json", "generation_config.json", "model.safetensors.index.json", QUANTIZATION_FILE}
)
#: Files copied from the source: tokenizer, sentence-transformers and Atelier JSON/text.
_COPIED_SUFFIXES: Final = (".json", ".txt", ".jinja", ".model")


def quantize(work: Work) -> None:
    weights = _weights_option(work)
    kind = KIND_OF_TASK.get(work.task)
    if kind is None:
        raise CompressionError("invalid_task", f"quantize cannot compress a {work.task!r} model")
    try:
        safeload.require_safetensors(work.source_dir)
    except safeload.UnsafeWeights as error:
        raise CompressionError("unsafe_weights", str(error)) from None
    if quantized.is_quantized(work.source_dir):
        raise CompressionError(
            "already_quantized", "the source is already quantized; quantize its original"
        )
    model = _load_source(work, kind)
    manifest = quantized.save(model, work.out_dir, weights=weights, kind=kind, device=work.device)
    copy_support_files(work.source_dir, work.out_dir)
    work.notes["quantization"] = {
        "weights": weights,
        "linear_modules": len(manifest["linear"]),
        "embedding_modules": sorted(manifest["embedding"]),
        "tied_heads": sorted(n for n, e in manifest["linear"].items() if e.get("tied_to")),
    }


def _weights_option(work: Work) -> str:
    value = work.options.get("weights", DEFAULT_WEIGHTS)
    if value not in QUANTIZE_WEIGHTS:
        raise CompressionError(
            "invalid_option",
            f"weights must be one of {', '.join(QUANTIZE_WEIGHTS)}, not {value!r}",
            param="weights",
        )
    weights = str(value)
    if weights in CUDA_ONLY and work.device.type != "cuda":
        raise CompressionError(
            "unsupported_on_device",
            f"weights={weights!r} needs a CUDA GPU worker, and this job runs on "
            f"{work.device.type}; weights='int8' works on every worker",
            param="weights",
        )
    return weights


def _load_source(work: Work, kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes: dict[str, Any] = {
        quantized.CAUSAL: AutoModelForCausalLM,
        quantized.ENCODER: AutoModel,
        quantized.CLASSIFIER: AutoModelForSequenceClassification,
    }
    # The source's own dtype: scales are computed in float32 from whatever is stored,
    # and tensors left unquantized are written exactly as they were.
    model = classes[kind].from_pretrained(
        str(work.source_dir), dtype="auto", **safeload.pretrained_kwargs()
    )
    model.requires_grad_(False)
    model.eval()
    if kind == quantized.CLASSIFIER and work.labels:
        _apply_labels(model, work.labels)
    return model


def _apply_labels(model: Any, labels: tuple[str, ...]) -> None:
    config = model.config
    if len(labels) != int(config.num_labels):
        raise CompressionError(
            "labels_mismatch",
            f"the job names {len(labels)} labels; the source classifier has {config.num_labels}",
        )
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


def copy_support_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer, sentence-transformers and other JSON/text files of `source`
    (top level, and the module folders modules.json names, e.g. 1_Pooling/), but never
    weights, pickles, or what `quantized.save` writes. Returns the copied names."""
    copied: list[str] = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in _COPIED_SUFFIXES and path.name not in _WRITTEN:
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    modules = source / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            folder = str(module.get("path") or "")
            if not folder or folder.startswith((".", "/")) or ".." in folder:
                continue  # the model itself ("" path) or a path out of the directory
            for path in sorted((source / folder).rglob("*")):
                if path.is_file() and path.suffix in _COPIED_SUFFIXES:
                    target = out / path.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
                    copied.append(path.relative_to(source).as_posix())
    return copied
