"""One attempt of an evaluation job, in process: `run_evaluation(spec, reporter)`.

Each model is loaded in turn (a LoRA adapter onto its base, a quantized artifact from
its own manifest), the file is tokenized as training tokenizes it, every row is scored,
and the per-row results of all models go to one JSON Lines file (see
`jobcontracts.evaluation`). Reports, heartbeats and the control signal work as in a
fine-tuning attempt (`training.control`); the metrics are the training loop's
(`training.objectives`), so a model's evaluation loss is the loss it was trained on.

Embedding models on a pairs file are loaded, pooled and embedded as compression measures
them (`compression.measure`: `load`, `pooling`, `embed`, the serving dtype, the texts cut
at its token limit), and scored with `retrieval`: each query's cosine to its own
positive, and the rank of that positive among all the file's positives. Ranks are
computed a block of queries at a time, so memory grows with the rows, not their square.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpuworkers import retrieval, safeload, storage
from gpuworkers.compression import measure, quantized
from gpuworkers.metrics import lease_expired
from gpuworkers.training import data, modeling, objectives
from gpuworkers.training.control import (
    Heartbeat,
    Outcome,
    Reporter,
    ReportSender,
    SignalPoller,
    SignalReader,
    storage_signal_reader,
)
from gpuworkers.training.errors import StaleAttempt, TrainingError
from jobcontracts.compression import SourceRef
from jobcontracts.evaluation import PAIRS_FORMAT, RECALL_KS, RESULTS_FILE, EvaluationSpec
from jobcontracts.training import CANCEL, CANCELLED, FAILED, PROGRESS, STARTED, SUCCEEDED

log = logging.getLogger(__name__)

__all__ = ["run_evaluation"]

#: Queries ranked against all positives at once: a (block, rows) score matrix.
RANK_BLOCK = 1024


class _Cancelled(Exception):
    pass


@dataclass
class _Scored:
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_evaluation(
    spec: EvaluationSpec, reporter: Reporter, *, signal_reader: SignalReader | None = None
) -> Outcome:
    """Run one attempt to its end and report it; never raises for what a user can fix."""
    sender = ReportSender(spec, reporter)
    poller = SignalPoller(spec, signal_reader or storage_signal_reader(spec.control_uri))
    heartbeat = Heartbeat(sender, spec.heartbeat_seconds)
    workdir = Path(tempfile.mkdtemp(prefix=f"eval-{spec.job_id}-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def check(*, force: bool = False) -> None:
        if poller.poll(force=force) == CANCEL:
            raise _Cancelled

    step = 0
    try:
        check(force=True)
        heartbeat.start("loading")
        local = workdir / "data.jsonl"
        try:
            storage.download_file(spec.data.uri, local)
        except FileNotFoundError:
            raise TrainingError(
                "invalid_file", f"the file was not found: {spec.data.uri}"
            ) from None
        results: list[dict[str, Any]] = []
        metrics: dict[str, dict[str, float]] = {}
        tokens: dict[str, int] = {}
        total = 0
        pairs = _read_pairs(local) if spec.data.format == PAIRS_FORMAT else None
        for index, ref in enumerate(spec.models):
            heartbeat.phase = "loading"
            scratch = workdir / f"model-{index}"
            scorer: _RowScorer | _PairScorer = (
                _PairScorer(ref, pairs, device)
                if pairs is not None
                else _RowScorer(ref, spec, local, scratch, device)
            )
            rows = scorer.rows
            batches = list(range(0, rows, spec.batch_size))
            if index == 0:
                total = len(batches) * len(spec.models)
                sender.send(
                    STARTED,
                    {
                        "device": device.type,
                        "models": [m.name for m in spec.models],
                        "rows": rows,
                        "total_steps": total,
                    },
                )
                results = [{"row": i, "results": {}} for i in range(rows)]
            elif rows != len(results):
                raise TrainingError(
                    "invalid_file", f"'{ref.name}' reads {rows} rows, not {len(results)}"
                )
            heartbeat.phase = "scoring"
            for start in batches:
                check()
                with torch.no_grad():
                    scorer.score(list(range(start, min(start + spec.batch_size, rows))))
                step += 1
                sender.send(PROGRESS, {"step": step, "total_steps": total, "model": ref.name})
            scored = scorer.finish()
            for row, result in zip(results, scored.rows, strict=True):
                row["results"][ref.name] = result
            metrics[ref.name] = scored.metrics
            tokens[ref.name] = scored.tokens
            del scorer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        heartbeat.phase = "uploading"
        out = workdir / RESULTS_FILE
        with out.open("w") as stream:
            for row in results:
                stream.write(json.dumps(row) + "\n")
        uri = storage.join(spec.output_uri, RESULTS_FILE)
        storage.upload_file(out, uri)
        sender.send(
            SUCCEEDED,
            {
                "step": step,
                "artifact_uri": uri,
                "artifact_files": [RESULTS_FILE],
                "rows": len(results),
                "metrics": metrics,
                "tokens": tokens,
            },
        )
        return Outcome("succeeded", step, artifact_uri=uri)
    except _Cancelled:
        sender.send(CANCELLED, {"step": step})
        return Outcome("cancelled", step)
    except StaleAttempt:
        sender.close()
        lease_expired("evaluation")
        return Outcome("stale", step)
    except TrainingError as error:
        sender.send(
            FAILED, {"code": error.code, "message": error.message, "retryable": error.retryable}
        )
        return Outcome("failed", step, error_code=error.code)
    except torch.cuda.OutOfMemoryError:
        message = "the GPU ran out of memory: lower batch_size or max_seq_len"
        sender.send(FAILED, {"code": "out_of_memory", "message": message, "retryable": False})
        return Outcome("failed", step, error_code="out_of_memory")
    except Exception as error:
        message = f"{type(error).__name__}: {error}"[:2000]
        sender.send(FAILED, {"code": "internal_error", "message": message, "retryable": True})
        raise
    finally:
        heartbeat.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class _RowScorer:
    """A causal LM or classifier on LM, preference or classification rows, tokenized as
    training tokenizes them; metrics as the training loop's."""

    def __init__(
        self, ref: SourceRef, spec: EvaluationSpec, local: Path, scratch: Path, device: torch.device
    ) -> None:
        self.model, tokenizer = _load(ref, spec.task, scratch, device)
        self.data = data.load(
            local,
            fmt=spec.data.format,
            tokenizer=tokenizer,
            labels=ref.labels,
            max_len=spec.max_seq_len,
            what="evaluation",
        )
        self.rows = len(self.data)
        self.classes = len(ref.labels)
        self.pad = int(tokenizer.pad_token_id)
        self.device = device
        self.scored = _Scored(metrics={}, rows=[])
        self.sums = [0.0, 0.0, 0.0] + [0.0] * (3 * self.classes)

    def score(self, chunk: list[int]) -> None:
        batch = {k: v.to(self.device) for k, v in self.data.collate(chunk, self.pad).items()}
        _score(self.data.kind, self.model, batch, self.scored, self.sums, self.classes)

    def finish(self) -> _Scored:
        self.scored.metrics = _metrics(self.data.kind, self.sums, self.scored)
        del self.model
        return self.scored


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """(query, positive) of each row of a pairs file (blank lines skipped, as validation
    skips them)."""
    pairs: list[tuple[str, str]] = []
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                query, positive = row["query"], row["positive"]
            except (ValueError, TypeError, KeyError):
                raise TrainingError(
                    "invalid_file", f"line {number} is not a query/positive pair"
                ) from None
            if not (isinstance(query, str) and isinstance(positive, str) and query and positive):
                raise TrainingError(
                    "invalid_file", f"line {number}: query and positive must be non-empty text"
                )
            pairs.append((query, positive))
    if not pairs:
        raise TrainingError("invalid_file", "the file has no query/positive pairs")
    return pairs


class _PairScorer:
    """An embedding model on query/positive pairs, embedded as compression measures it."""

    def __init__(self, ref: SourceRef, pairs: list[tuple[str, str]], device: torch.device) -> None:
        if ref.adapter_uri:
            raise TrainingError(
                "unsupported_model", f"'{ref.name}' is an adapter: embedding models have none"
            )
        folder = modeling.local_dir(ref.uri, what="model", cache=True)
        try:
            self.model, self.tokenizer = measure.load(folder, task="embeddings", device=device)
        except safeload.UnsafeWeights as error:
            raise TrainingError("unsafe_weights", str(error)) from None
        self.mode = measure.pooling(folder)
        self.pairs = pairs
        self.rows = len(pairs)
        self.device = device
        self.queries: list[torch.Tensor] = []
        self.positives: list[torch.Tensor] = []
        self.tokens = 0

    def _embed(self, texts: list[str]) -> torch.Tensor:
        # What `embed` feeds the model, to count the tokens it read (padding aside).
        encoded = measure._encode(self.tokenizer, self.model, texts, self.device)
        self.tokens += int(encoded["attention_mask"].sum())
        return measure.embed(self.model, self.tokenizer, texts, self.device, self.mode)

    def score(self, chunk: list[int]) -> None:
        self.queries.append(self._embed([self.pairs[i][0] for i in chunk]))
        self.positives.append(self._embed([self.pairs[i][1] for i in chunk]))

    def finish(self) -> _Scored:
        del self.model
        queries, positives = torch.cat(self.queries), torch.cat(self.positives)
        cosines = (queries * positives).sum(dim=-1).tolist()
        ranks = own_key_ranks(queries, positives)
        mean = retrieval.mean_cosine(queries, positives)
        assert mean is not None  # one model embeds queries and positives alike
        metrics = {"mean_cosine": mean}
        for k in RECALL_KS:
            metrics[f"recall_at_{k}"] = round(sum(r < k for r in ranks) / len(ranks), 6)
        rows = [{"cosine": round(c, 6), "rank": r + 1} for c, r in zip(cosines, ranks, strict=True)]
        return _Scored(metrics=metrics, rows=rows, tokens=self.tokens)


def own_key_ranks(
    queries: torch.Tensor, keys: torch.Tensor, *, block: int = RANK_BLOCK
) -> list[int]:
    """For each query row i, how many keys rank ahead of key i (0: its own key is its
    nearest), with `retrieval.recall_at_k`'s order: a higher score, or the same score at a
    lower index. `recall_at_k` is then the share of ranks below k; computed `block` queries
    at a time, so a file of 100,000 pairs needs no 100,000² matrix."""
    if queries.shape != keys.shape:
        raise ValueError("queries and keys must have the same shape")
    n = queries.shape[0]
    keys = keys.float()
    index = torch.arange(n)
    ranks: list[int] = []
    for start in range(0, n, block):
        rows = index[start : start + block]
        scores = queries[start : start + block].float() @ keys.T  # (block, n)
        own = scores[torch.arange(rows.shape[0]), rows].unsqueeze(1)
        ahead = (scores > own) | ((scores == own) & (index.unsqueeze(0) < rows.unsqueeze(1)))
        ranks.extend(int(r) for r in ahead.sum(dim=1).tolist())
    return ranks


def _load(ref: SourceRef, task: str, scratch: Path, device: torch.device) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a base, full, LoRA or quantized model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = modeling.local_dir(ref.uri, what="model", cache=True)
    adapter = None
    if ref.adapter_uri:
        adapter = modeling.local_dir(ref.adapter_uri, what="model", cache=False)
    try:
        safeload.require_safetensors(folder, what=f"the model '{ref.name}'")
    except safeload.UnsafeWeights as error:
        raise TrainingError("unsafe_weights", str(error)) from None
    tokenizer_dir = adapter if adapter and (adapter / "tokenizer_config.json").exists() else folder
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kind = "classifier" if task == "classification" else "causal"
    kwargs: dict[str, Any] = {"dtype": dtype, **safeload.pretrained_kwargs()}
    if quantized.is_quantized(folder):
        model: Any = quantized.load_model(folder, kind=kind, device=device, dtype=dtype)
    elif task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=len(ref.labels), pad_token_id=tokenizer.pad_token_id, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if task == "classification":
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    if adapter is not None and storage.local_path(ref.adapter_uri or "") is None:
        shutil.rmtree(adapter, ignore_errors=True)
    return model, tokenizer


def _score(
    kind: str,
    model: Any,
    batch: dict[str, torch.Tensor],
    scored: _Scored,
    sums: list[float],
    classes: int,
) -> None:
    """Add a batch's rows to `scored.rows` and its totals to `sums` (loss, count, correct,
    then per-class tp, fp, fn)."""
    scored.tokens += int(batch["attention_mask"].sum())
    if kind == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        predicted = logits.argmax(-1)
        for loss, label, guess in zip(
            losses.tolist(), labels.tolist(), predicted.tolist(), strict=True
        ):
            scored.rows.append({"label": label, "predicted": guess, "correct": label == guess})
            sums[0] += loss
            sums[1] += 1
            sums[2] += float(label == guess)
        counts = objectives.confusion_counts(predicted.cpu(), labels.cpu(), classes)
        for i, value in enumerate(counts):
            sums[3 + i] += value
        return
    if kind == "preference":
        logps = objectives.sequence_logps(model, batch)
        pairs = logps.size(0) // 2
        for chosen, rejected in zip(logps[:pairs].tolist(), logps[pairs:].tolist(), strict=True):
            correct = chosen > rejected
            scored.rows.append(
                {"chosen_logp": chosen, "rejected_logp": rejected, "correct": correct}
            )
            sums[0] += chosen - rejected
            sums[1] += 1
            sums[2] += float(correct)
        return
    # One forward: each row's summed cross-entropy over its learned tokens.
    logits = (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        .logits[:, :-1]
        .float()
    )
    labels = batch["labels"][:, 1:]
    learned = labels != data.IGNORE
    token_losses = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=data.IGNORE, reduction="none"
    )
    losses = token_losses.sum(-1)
    learned_counts = learned.sum(-1)
    hits = ((logits.argmax(-1) == labels) & learned).sum(-1)
    for loss, count, hit in zip(
        losses.tolist(), learned_counts.tolist(), hits.tolist(), strict=True
    ):
        scored.rows.append({"loss": loss / max(count, 1), "tokens": count})
        sums[0] += loss
        sums[1] += count
        sums[2] += hit


def _metrics(kind: str, sums: list[float], scored: _Scored) -> dict[str, float]:
    count = max(sums[1], 1.0)
    if kind == "preference":
        return {"preference_accuracy": sums[2] / count, "mean_margin": sums[0] / count}
    found = objectives.metrics(
        kind, loss=sums[0], count=sums[1], correct=sums[2], prefix="x", confusion=sums[3:]
    )
    out = {name.removeprefix("x_"): value for name, value in found.items()}
    if kind != "classification":
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
        out["tokens"] = sums[1]
    return out
