"""The before/after measures of a compression job: size, memory, latency and quality.

`measure(folder, ...)` loads one Hugging Face directory the way the inference workers
do (a quantized directory through `quantized.load_model`, any other through
`from_pretrained` with safetensors only, in the serving dtype: bf16/fp16 on CUDA, fp32
on CPU) and returns its `Measures`:

- "parameters": the elements of every floating-point tensor stored in the directory's
  safetensors files and of a quantized artifact's quantized weights (not its per-channel
  scales, nor stored integer ids), read from the headers: once loaded, a quantized
  model's int8 weights live in packed kernel handles that no parameter count sees. Tied
  weights are stored, and counted, once.
- "file_bytes": the sizes of the directory's `*.safetensors` files added up.
- "peak_memory_bytes": on CUDA, `torch.cuda.max_memory_allocated` over loading the model
  and every forward of this measure, less what was allocated before. On CPU there is no
  allocator statistic, so it is the bytes of the loaded parameters, buffers and packed
  int8 weights plus the peak of live tensor bytes during one batch-16 forward, read from
  torch.profiler's memory events (allocations and frees in order, added up) — the
  process's RSS would count the Python heap, libraries and whatever the worker held
  before.
- "latency_ms_p50_batch1" / "latency_ms_p50_batch16": the median wall time of a forward
  over fixed inputs (the first 1 / 16 texts, cycled when fewer, padded and truncated to
  128 tokens), after warm-up forwards, synchronised on CUDA.
- "quality": causal_lm → perplexity of the texts (exp of the mean token loss);
  classification → accuracy on the labelled texts, plus "f1" (macro); embeddings → the
  mean cosine between each text's pooled, normalised embedding and the source's
  (`reference`; the source itself gets 1.0). None when there is nothing to measure it on
  (a classifier with no labelled validation rows; a student whose embeddings have
  another width than the source's).

`measure_pair` measures the source and then the result against it: the ratios of
`report()` compare the two as measured on the same worker in the same run.

Given held-out test texts, each side's measures also hold its scores on them (after the
measures above, so they change none of them): causal_lm → "test_loss" (mean next-token
loss) and "test_perplexity"; classification → "test_accuracy" and "test_macro_f1";
embeddings → "test_cosine_to_source" and "test_recall_at_{k}" for k in
`retrieval.DEFAULT_KS`: how often the source's embedding of a test text is among the k
nearest to this side's embedding of it, out of the source's embeddings of every test
text (`retrieval.recall_at_k`; the source retrieving itself scores 1.0 unless texts
repeat). Those two are None for a result of another width than its source.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from gpuworkers import retrieval, safeload

# Progress bars for loading weights are noise in a worker's log.
transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

#: Latency inputs: this many tokens a row.
LATENCY_TOKENS = 128
WARMUP = 2
REPS_BATCH1 = 7
REPS_BATCH16 = 5
#: Quality is measured on at most this many texts, and each on at most this many tokens.
MAX_QUALITY_TEXTS = 512
MAX_QUALITY_TOKENS = 512
QUALITY_BATCH = 8
#: Held-out test rows scored at most (the first ones; `test_rows` says how many were).
MAX_TEST_ROWS = 4096

QUALITY_METRICS = {
    "causal_lm": "perplexity",
    "classification": "accuracy",
    "embeddings": "cosine_to_source",
}
#: What the model loader calls each task's model (the inference workers' kinds).
MODEL_KINDS = {"causal_lm": "causal", "classification": "classifier", "embeddings": "encoder"}

#: Texts for latency (and embedding similarity, and perplexity) when a job has no
#: validation rows: short and long, plain and technical, questions and statements.
BUILTIN_TEXTS: tuple[str, ...] = (
    "The cat sat on the mat and watched the rain fall outside.",
    "Your order has shipped and will arrive on Monday.",
    "How do I reset my password if I no longer have access to my email?",
    "The invoice for last month is attached to this message.",
    "Quantum computers use qubits, which can hold a superposition of states.",
    "We are sorry for the delay; our team will call you back today.",
    "Please describe the steps you took before the error appeared.",
    "The river flooded the valley after three days of heavy rain.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Can you recommend a good book about the history of mathematics?",
    "The meeting has been moved to Thursday at half past two.",
    "A binary search halves the interval it looks at with every comparison.",
    "She planted tomatoes, basil and peppers in the garden this spring.",
    "Refunds are issued to the original payment method within five days.",
    "The museum opens at nine and closes at six, except on public holidays.",
    "Latency is the time between a request being sent and its answer arriving.",
    "He played the violin every evening after dinner for twenty years.",
    "What is the difference between a virus and a bacterium?",
    "The new bridge will carry four lanes of traffic and a cycle path.",
    "Store the keys in a safe place and never share them with anyone.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Our quarterly revenue grew by twelve percent compared to last year.",
    "I would like to change the shipping address on my account.",
    "The orchestra tuned their instruments before the concert began.",
    "Gradient descent updates the weights in the direction that lowers the loss.",
    "Thank you for your patience while we look into this problem.",
    "The train to the airport leaves every fifteen minutes from platform four.",
    "Why does the sky look blue during the day and red at sunset?",
    "The committee approved the budget after a long discussion.",
    "Birds migrate south in autumn to find food and warmer weather.",
    "This product is terrible and broke after one day of use.",
)

Measures = dict[str, Any]


def pick_dtype(device: torch.device) -> torch.dtype:
    """The dtype the inference workers serve in on `device` (their default)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def measure(
    folder: Path,
    *,
    task: str,
    device: torch.device,
    texts: Sequence[str],
    labels: Sequence[int],
    reference: torch.Tensor | None = None,
) -> Measures:
    """Measures of the model in `folder` (see the module's docstring); `labels` are the
    class ids of `texts` for a classifier (empty: no accuracy), `reference` the source's
    embeddings of `texts` for an embedding model (None: this is the source)."""
    measures, _, _ = _measure(
        folder, task=task, device=device, texts=texts, labels=labels, reference=reference
    )
    return measures


def measure_pair(
    source: Path,
    result: Path,
    *,
    task: str,
    device: torch.device,
    texts: Sequence[str],
    labels: Sequence[int],
    test_texts: Sequence[str] = (),
    test_labels: Sequence[int] = (),
) -> tuple[Measures, Measures]:
    """The source's measures, then the result's (its embeddings compared to the source's);
    with `test_texts`, each side's test scores too (see the module's docstring)."""
    test = _Test(list(test_texts), list(test_labels))
    before, embeddings, test.reference = _measure(
        source, task=task, device=device, texts=texts, labels=labels, reference=None, test=test
    )
    after, _, _ = _measure(
        result,
        task=task,
        device=device,
        texts=texts,
        labels=labels,
        reference=embeddings,
        test=test,
    )
    return before, after


class _Test:
    """Held-out test rows, and the source's embeddings of them once measured."""

    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts, self.labels = texts, labels
        self.reference: torch.Tensor | None = None


def ratios(source: Measures, result: Measures) -> dict[str, float | None]:
    """The result relative to the source: size = result bytes / source bytes (0.25: a
    quarter the size); speed = source latency / result latency (2.0: twice as fast);
    quality = result quality / source quality (for perplexity, above 1 is worse)."""
    return {
        "size": _ratio(result["file_bytes"], source["file_bytes"]),
        "speed_batch1": _ratio(source["latency_ms_p50_batch1"], result["latency_ms_p50_batch1"]),
        "speed_batch16": _ratio(source["latency_ms_p50_batch16"], result["latency_ms_p50_batch16"]),
        "quality": _ratio(result["quality"], source["quality"]),
    }


def _ratio(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or bottom == 0:
        return None
    return round(float(top) / float(bottom), 4)


def peak_memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "weights_plus_profiled_forward"


def load(folder: Path, *, task: str, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) as the inference workers load them: eval mode, no grads."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from gpuworkers.compression import quantized

    safeload.require_safetensors(folder)
    dtype = pick_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any
    if quantized.is_quantized(folder):
        model = quantized.load_model(folder, kind=MODEL_KINDS[task], device=device, dtype=dtype)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, **safeload.pretrained_kwargs()}
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        elif task == "classification":
            if tokenizer.pad_token_id is not None:
                kwargs["pad_token_id"] = tokenizer.pad_token_id
            model = AutoModelForSequenceClassification.from_pretrained(str(folder), **kwargs)
        else:
            model = AutoModel.from_pretrained(str(folder), **kwargs)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return model, tokenizer


def _measure(
    folder: Path,
    *,
    task: str,
    device: torch.device,
    texts: Sequence[str],
    labels: Sequence[int],
    reference: torch.Tensor | None,
    test: _Test | None = None,
) -> tuple[Measures, torch.Tensor | None, torch.Tensor | None]:
    """(measures, embeddings of `texts`, embeddings of the test texts); the embeddings
    only for an embedding model."""
    texts = list(texts)[:MAX_QUALITY_TEXTS] or list(BUILTIN_TEXTS)
    labels = list(labels)[: len(texts)]
    cuda = device.type == "cuda"
    baseline = 0
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    model, tokenizer = load(folder, task=task, device=device)
    try:
        measures: Measures = {
            "parameters": count_parameters(folder),
            "file_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        }
        embeddings: torch.Tensor | None = None
        with torch.inference_mode():
            if task == "causal_lm":
                measures["quality"] = perplexity(model, tokenizer, texts, device)
            elif task == "classification":
                accuracy, f1 = classify(model, tokenizer, texts, labels, device)
                measures["quality"], measures["f1"] = accuracy, f1
            else:
                embeddings = embed(model, tokenizer, texts, device, pooling(folder))
                measures["quality"] = (
                    1.0 if reference is None else retrieval.mean_cosine(embeddings, reference)
                )
            batch1, batch16 = (_latency_inputs(tokenizer, model, texts, n, device) for n in (1, 16))
            run = _forward(model)
            measures["latency_ms_p50_batch1"] = _median_ms(run, batch1, REPS_BATCH1, device)
            measures["latency_ms_p50_batch16"] = _median_ms(run, batch16, REPS_BATCH16, device)
            if cuda:
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - baseline
            else:
                peak = _tensor_bytes(model) + _profiled_peak(run, batch16)
            test_embeddings: torch.Tensor | None = None
            if test is not None and test.texts:
                scores, test_embeddings = test_scores(
                    model,
                    tokenizer,
                    task=task,
                    device=device,
                    texts=test.texts[:MAX_TEST_ROWS],
                    labels=test.labels[:MAX_TEST_ROWS],
                    mode=pooling(folder),
                    reference=test.reference,
                )
                measures.update(scores)
        measures["peak_memory_bytes"] = int(peak)
        return measures, embeddings, test_embeddings
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def count_parameters(folder: Path) -> int:
    from gpuworkers.compression import quantized

    scales: set[str] = set()
    weights: set[str] = set()
    if quantized.is_quantized(folder):
        manifest = quantized.read_manifest(folder)
        for section in ("linear", "embedding"):
            scales.update(f"{name}.scale" for name in manifest[section])
            weights.update(f"{name}.qweight" for name in manifest[section])
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        for name, info in header.items():
            if name == "__metadata__" or name in scales:
                continue
            # Integer tensors that are not quantized weights are ids (an old
            # checkpoint's position_ids), not parameters.
            if str(info["dtype"]).startswith(("F", "BF")) or name in weights:
                total += math.prod(int(dim) for dim in info["shape"])
    return total


def _tensor_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    # Int8 weights packed for the CPU kernel are neither parameters nor buffers.
    for module in model.modules():
        total += int(getattr(module, "packed_nbytes", 0))
    return total


def _profiled_peak(run: Callable[[dict[str, torch.Tensor]], Any], inputs: dict[str, Any]) -> int:
    """The most tensor bytes alive at once during `run(inputs)`, beyond those alive before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(inputs)
    results: Any = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        return 0
    events = sorted(
        (event.start_ns(), int(event.nbytes()))
        for event in results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _forward(model: Any) -> Callable[[dict[str, torch.Tensor]], Any]:
    def run(inputs: dict[str, torch.Tensor]) -> Any:
        return model(**inputs)

    return run


def _latency_inputs(
    tokenizer: Any, model: Any, texts: Sequence[str], n: int, device: torch.device
) -> dict[str, torch.Tensor]:
    rows = [texts[i % len(texts)] for i in range(n)]
    width = min(LATENCY_TOKENS, _context(model))
    encoded = tokenizer(
        rows, padding="max_length", truncation=True, max_length=width, return_tensors="pt"
    )
    return {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}


def _median_ms(
    run: Callable[[dict[str, torch.Tensor]], Any],
    inputs: dict[str, torch.Tensor],
    reps: int,
    device: torch.device,
) -> float:
    cuda = device.type == "cuda"
    for _ in range(WARMUP):
        run(inputs)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run(inputs)
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def _context(model: Any) -> int:
    config = model.config
    limits = [
        value
        for value in (getattr(config, n, None) for n in ("max_position_embeddings", "n_positions"))
        if isinstance(value, int) and value > 0
    ]
    return min(limits) if limits else 2048


def _batches(texts: Sequence[str]) -> list[list[str]]:
    return [list(texts[i : i + QUALITY_BATCH]) for i in range(0, len(texts), QUALITY_BATCH)]


def _encode(tokenizer: Any, model: Any, texts: Sequence[str], device: torch.device) -> Any:
    width = min(MAX_QUALITY_TOKENS, _context(model), _tokenizer_limit(tokenizer))
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=width, return_tensors="pt"
    )
    return {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}


def _tokenizer_limit(tokenizer: Any) -> int:
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    return limit if 0 < limit < 1_000_000 else MAX_QUALITY_TOKENS


def test_scores(
    model: Any,
    tokenizer: Any,
    *,
    task: str,
    device: torch.device,
    texts: Sequence[str],
    labels: Sequence[int],
    mode: str,
    reference: torch.Tensor | None,
) -> tuple[dict[str, float | None], torch.Tensor | None]:
    """(the `test_…` scores of a loaded model on held-out texts, its embeddings of them for
    an embedding model). `reference`: the source's embeddings of the same texts (None:
    this is the source, scored against itself)."""
    if task == "causal_lm":
        loss = mean_token_loss(model, tokenizer, texts, device)
        if not math.isfinite(loss):  # no text of two tokens: nothing was predicted
            return {"test_loss": None, "test_perplexity": None}, None
        return {
            "test_loss": round(loss, 6),
            "test_perplexity": round(math.exp(min(loss, 700.0)), 4),
        }, None
    if task == "classification":
        accuracy, f1 = classify(model, tokenizer, texts, labels, device)
        return {"test_accuracy": accuracy, "test_macro_f1": f1}, None
    embeddings = embed(model, tokenizer, texts, device, mode)
    keys = embeddings if reference is None else reference
    recall: dict[int, float | None]
    try:
        recall = dict(retrieval.recall_at_k(embeddings, keys, retrieval.DEFAULT_KS))
    except ValueError:  # another width: the result embeds in another space
        recall = dict.fromkeys(retrieval.DEFAULT_KS)
    scores: dict[str, float | None] = {
        "test_cosine_to_source": retrieval.mean_cosine(embeddings, keys),
        **{f"test_recall_at_{k}": value for k, value in recall.items()},
    }
    return scores, embeddings


def mean_token_loss(
    model: Any, tokenizer: Any, texts: Sequence[str], device: torch.device
) -> float:
    """The mean next-token cross-entropy (nats) over every predicted token of `texts`
    (NaN when no text has two tokens)."""
    total_loss = 0.0
    total_tokens = 0
    for batch in _batches(texts):
        inputs = _encode(tokenizer, model, batch, device)
        logits = model(**inputs).logits.float()
        targets = inputs["input_ids"][:, 1:]
        keep = inputs["attention_mask"][:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        total_loss += float(losses[keep.reshape(-1)].sum())
        total_tokens += int(keep.sum())
    if total_tokens == 0:
        return math.nan
    return total_loss / total_tokens


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], device: torch.device) -> float:
    """exp(mean next-token loss) over every predicted token of `texts`."""
    loss = mean_token_loss(model, tokenizer, texts, device)
    if math.isnan(loss):
        return math.nan
    return round(math.exp(min(loss, 700.0)), 4)


def classify(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    device: torch.device,
) -> tuple[float | None, float | None]:
    """(accuracy, macro F1) on the labelled texts; (None, None) with no labels."""
    if not labels:
        return None, None
    predicted: list[int] = []
    for batch in _batches(texts[: len(labels)]):
        logits = model(**_encode(tokenizer, model, batch, device)).logits
        predicted.extend(int(i) for i in logits.argmax(dim=-1).tolist())
    pairs = list(zip(predicted, labels, strict=True))
    accuracy = sum(p == t for p, t in pairs) / len(pairs)
    scores = []
    for label in sorted(set(labels) | set(predicted)):
        tp = sum(p == label and t == label for p, t in pairs)
        fp = sum(p == label and t != label for p, t in pairs)
        fn = sum(p != label and t == label for p, t in pairs)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return round(accuracy, 4), round(sum(scores) / len(scores), 4)


def pooling(folder: Path) -> str:
    """The sentence-transformers pooling of `folder` (modules.json → Pooling config):
    cls | max | last | mean; mean when the directory names none."""
    modules_path = folder / "modules.json"
    if not modules_path.exists():
        return "mean"
    for module in json.loads(modules_path.read_text()):
        if not str(module.get("type", "")).endswith(".Pooling"):
            continue
        config = folder / str(module.get("path", "")) / "config.json"
        if not config.exists():
            continue
        options = json.loads(config.read_text())
        for key, name in (
            ("pooling_mode_cls_token", "cls"),
            ("pooling_mode_max_tokens", "max"),
            ("pooling_mode_lasttoken", "last"),
            ("pooling_mode_mean_tokens", "mean"),
        ):
            if options.get(key):
                return name
    return "mean"


def embed(
    model: Any, tokenizer: Any, texts: Sequence[str], device: torch.device, mode: str
) -> torch.Tensor:
    """(N, hidden) float32 unit vectors, pooled as `mode` over the attention mask."""
    out = []
    for batch in _batches(texts):
        inputs = _encode(tokenizer, model, batch, device)
        hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"]
        weights = mask[..., None].to(hidden.dtype)
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "max":
            pooled = hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
        elif mode == "last":
            ends = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]
        else:
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu())
    return torch.cat(out)
