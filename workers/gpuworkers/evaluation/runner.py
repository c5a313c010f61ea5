"""One attempt of an evaluation job, in process: `run_evaluation(spec, reporter)`.

Each model is loaded in turn (a LoRA adapter onto its base, a quantized artifact from
its own manifest), the file is tokenized as training tokenizes it, every row is scored,
and the per-row results of all models go to one JSON Lines file (see
`jobcontracts.evaluation`). Reports, heartbeats and the control signal work as in a
fine-tuning attempt (`training.control`); the metrics are the training loop's
(`training.objectives`), so a model's evaluation loss is the loss it was trained on.
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

from gpuworkers import safeload, storage
from gpuworkers.compression import quantized
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
from jobcontracts.evaluation import RESULTS_FILE, EvaluationSpec
from jobcontracts.training import CANCEL, CANCELLED, FAILED, PROGRESS, STARTED, SUCCEEDED

log = logging.getLogger(__name__)

__all__ = ["run_evaluation"]


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
        for index, ref in enumerate(spec.models):
            heartbeat.phase = "loading"
            model, tokenizer = _load(ref, spec.task, workdir / f"model-{index}", device)
            rows = data.load(
                local,
                fmt=spec.data.format,
                tokenizer=tokenizer,
                labels=ref.labels,
                max_len=spec.max_seq_len,
                what="evaluation",
            )
            batches = list(range(0, len(rows), spec.batch_size))
            if index == 0:
                total = len(batches) * len(spec.models)
                sender.send(
                    STARTED,
                    {
                        "device": device.type,
                        "models": [m.name for m in spec.models],
                        "rows": len(rows),
                        "total_steps": total,
                    },
                )
                results = [{"row": i, "results": {}} for i in range(len(rows))]
            elif len(rows) != len(results):
                raise TrainingError(
                    "invalid_file", f"'{ref.name}' reads {len(rows)} rows, not {len(results)}"
                )
            heartbeat.phase = "scoring"
            scored = _Scored(metrics={}, rows=[])
            sums = [0.0, 0.0, 0.0] + [0.0] * (3 * len(ref.labels))
            pad = int(tokenizer.pad_token_id)
            for start in batches:
                check()
                chunk = list(range(start, min(start + spec.batch_size, len(rows))))
                batch = {k: v.to(device) for k, v in rows.collate(chunk, pad).items()}
                with torch.no_grad():
                    _score(rows.kind, model, batch, scored, sums, len(ref.labels))
                step += 1
                sender.send(PROGRESS, {"step": step, "total_steps": total, "model": ref.name})
            for row, result in zip(results, scored.rows, strict=True):
                row["results"][ref.name] = result
            metrics[ref.name] = _metrics(rows.kind, sums, scored)
            tokens[ref.name] = scored.tokens
            del model
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
