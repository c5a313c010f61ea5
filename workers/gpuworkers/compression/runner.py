"""One attempt of a compression job, in process: `run_compression(spec, reporter)`.

Load the source (LoRA merged), read the rows, run the method, measure the source and
the result on this worker, upload the result to `{output_uri}/final`, and report
`started … succeeded` (see `jobcontracts.compression`). Held-out test rows (a test file,
or the `test_fraction` of the training rows `held_out_rows` names) are taken out before
the method sees any row, and both models are scored on them at the end. Reports,
heartbeats and the control signal work as in a fine-tuning attempt (`training.control`).

Testable without Celery: `reporter` is any callable taking `Report`s and
`signal_reader` any callable returning the current `Signal` (or None).

The methods live in their own modules and are imported by name from `METHODS` when an
attempt needs one, so this module imports without them. `METHODS` is also the test
hook: a test may point a method's name at another "module:function" (monkeypatch.setitem)
to run a method of its own.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpuworkers import metrics, safeload, storage
from gpuworkers.compression import measure
from gpuworkers.compression.context import Cancelled, CompressionError, Work
from gpuworkers.training import formats
from gpuworkers.training.control import (
    Heartbeat,
    Outcome,
    Reporter,
    ReportSender,
    SignalPoller,
    SignalReader,
    storage_signal_reader,
)
from gpuworkers.training.distributed import cpu_threads
from gpuworkers.training.errors import StaleAttempt, TrainingError
from gpuworkers.training.loop import PROGRESS_EVERY_SECONDS
from jobcontracts.compression import CompressionSpec, SourceRef
from jobcontracts.training import (
    CANCEL,
    CANCELLED,
    FAILED,
    PROGRESS,
    STARTED,
    SUCCEEDED,
    DataRef,
    held_out_rows,
)

log = logging.getLogger(__name__)

__all__ = ["METHODS", "Outcome", "run_compression"]

#: Method name → "module:function" of `fn(work: Work) -> None`, imported when used.
METHODS: dict[str, str] = {
    "quantize": "gpuworkers.compression.quantize:quantize",
    "prune": "gpuworkers.compression.prune:prune",
    "distill": "gpuworkers.compression.distill:distill",
}
#: The option that sets each method's training steps (for `started`'s total_steps;
#: the control plane sends options resolved, defaults filled in).
STEP_OPTIONS: dict[str, str] = {"prune": "recovery_steps", "distill": "steps"}
#: Row formats each task's data may have.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("chat", "prompt_completion", "text"),
    "embeddings": ("text", "chat", "prompt_completion"),
    "classification": ("classification",),
}
#: Weight files that are replaced when an adapter is merged into its base.
_WEIGHT_INDEX = "model.safetensors.index.json"
#: Written last, so a reader that waits for it sees a complete directory.
MANIFEST = "atelier.json"
REPORT_FILE = "atelier_compression_report.json"


@dataclass
class _Progress:
    step: int = 0
    sent_at: float = float("-inf")


@dataclass
class Rows:
    """The samples of a data file: texts, label ids (a classifier's, else empty) and the
    0-based index of the file row (blank lines skipped) each sample came from."""

    texts: list[str]
    labels: list[int]
    rows: list[int]
    #: Rows in the file.
    count: int = 0

    def select(self, keep: Callable[[int], bool]) -> Rows:
        """The samples of the rows `keep` accepts, in order."""
        chosen = [i for i, row in enumerate(self.rows) if keep(row)]
        return Rows(
            [self.texts[i] for i in chosen],
            [self.labels[i] for i in chosen] if self.labels else [],
            [self.rows[i] for i in chosen],
            len({self.rows[i] for i in chosen}),
        )


def resolve(method: str) -> Callable[[Work], None]:
    """The method function registered under `method` (imported now)."""
    target = METHODS.get(method)
    if target is None:
        raise CompressionError("invalid_spec", f"unknown method {method!r}", param="method")
    module_name, _, function = target.partition(":")
    fn: Callable[[Work], None] = getattr(importlib.import_module(module_name), function)
    return fn


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_compression(
    spec: CompressionSpec, reporter: Reporter, *, signal_reader: SignalReader | None = None
) -> Outcome:
    """Run one attempt to its end and report it; never raises for what a user can fix.

    A `CompressionError` is reported as `failed` (not retryable) and returned; a cancel
    signal stops it before anything is uploaded; a stale attempt returns quietly;
    anything unexpected is reported as `failed` (retryable) and re-raised.
    """
    sender = ReportSender(spec, reporter)
    poller = SignalPoller(spec, signal_reader or storage_signal_reader(spec.control_uri))
    heartbeat = Heartbeat(sender, spec.heartbeat_seconds)
    workdir = Path(tempfile.mkdtemp(prefix=f"compress-{spec.job_id}-"))
    progress = _Progress()

    def check(*, force: bool = False) -> None:
        # A compression attempt has nothing to checkpoint: PAUSE is not acted on.
        if poller.poll(force=force) == CANCEL:
            raise Cancelled()

    try:
        check(force=True)  # a superseded attempt should not even load the model
        device = pick_device()
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(1))
        sender.send(
            STARTED,
            {"device": str(device), "method": spec.method, "total_steps": _planned_steps(spec)},
        )
        heartbeat.start("loading")
        return _run(spec, device, workdir, heartbeat, sender, check, progress)
    except Cancelled:
        sender.send(CANCELLED, {"step": progress.step})
        log.info("compression.cancelled", extra={"job_id": spec.job_id, "step": progress.step})
        return Outcome("cancelled", progress.step)
    except StaleAttempt:
        sender.close()
        metrics.lease_expired("compression")
        log.info("compression.stale_attempt", extra={"job_id": spec.job_id})
        return Outcome("stale", progress.step)
    except CompressionError as error:
        _fail(sender, error.code, error.message, param=error.param, retryable=False)
        return Outcome("failed", progress.step, error_code=error.code)
    except torch.cuda.OutOfMemoryError:
        message = "the GPU ran out of memory: use a smaller batch_size or max_seq_len"
        _fail(sender, "out_of_memory", message, param=None, retryable=False)
        return Outcome("failed", progress.step, error_code="out_of_memory")
    except Exception as error:
        message = f"{type(error).__name__}: {error}"[:2000]
        _fail(sender, "internal_error", message, param=None, retryable=True)
        raise
    finally:
        heartbeat.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        _release_memory()


def _run(
    spec: CompressionSpec,
    device: torch.device,
    workdir: Path,
    heartbeat: Heartbeat,
    sender: ReportSender,
    check: Callable[..., None],
    progress: _Progress,
) -> Outcome:
    method = resolve(spec.method)
    source_dir = _source_dir(spec.source, spec.task, workdir / "source", what="source")
    student_dir = None
    if spec.student is not None:
        student_dir = _source_dir(spec.student, spec.task, workdir / "student", what="student")
    tokenizer = _tokenizer(source_dir)
    train = _rows(spec, spec.training_data, tokenizer, workdir, "training")
    valid = _rows(spec, spec.validation_data, tokenizer, workdir, "validation")
    # Before the method sees a row: a held-out row never reaches calibration or training.
    train, test = held_out(spec, train, tokenizer, workdir)

    def step(n: int, total: int, loss: float | None) -> None:
        progress.step = n
        check()
        # Each report becomes an event the customer lists: at most one a second (as
        # training's loop sends them), and always the first and the last step.
        now = time.monotonic()
        if n not in (1, total) and now - progress.sent_at < PROGRESS_EVERY_SECONDS:
            return
        progress.sent_at = now
        sender.send(
            PROGRESS,
            {"step": n, "total_steps": total, "phase": heartbeat.phase, "train_loss": loss},
        )

    out_dir = workdir / "out"
    work = Work(
        task=spec.task,
        method=spec.method,
        source_dir=source_dir,
        out_dir=out_dir,
        options=dict(spec.options),
        device=device,
        seed=spec.seed,
        train_texts=train.texts,
        train_labels=train.labels,
        student_dir=student_dir,
        labels=spec.source.labels,
        step=step,
    )
    check(force=True)
    heartbeat.phase = "compressing"
    torch.manual_seed(spec.seed)
    method(work)
    _require_result(out_dir)

    check(force=True)
    heartbeat.phase = "measuring"
    report = _report(spec, work, device, valid, test)

    check(force=True)
    heartbeat.phase = "uploading"
    _write_manifest(spec, work, report)
    final_uri = storage.join(spec.output_uri, "final")
    names = storage.upload_dir(out_dir, final_uri, last=(MANIFEST,))
    trained_tokens = _trained_tokens(work)
    sender.send(
        SUCCEEDED,
        {
            "artifact_uri": final_uri,
            "artifact_files": names,
            "artifact_kind": "full",
            "trained_tokens": trained_tokens,
            "report": report,
            "test_metrics": _test_metrics(report),
        },
    )
    return Outcome("succeeded", progress.step, trained_tokens, artifact_uri=final_uri)


def _fail(
    sender: ReportSender, code: str, message: str, *, param: str | None, retryable: bool
) -> None:
    sender.send(FAILED, {"code": code, "message": message, "param": param, "retryable": retryable})


def _release_memory() -> None:
    # The pool process lives on: hand the job's memory (and cached GPU memory) back.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _planned_steps(spec: CompressionSpec) -> int:
    value = spec.options.get(STEP_OPTIONS.get(spec.method, ""))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _trained_tokens(work: Work) -> int:
    value = work.notes.get("trained_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- the source ---------------------------------------------------------------------------


def _local(uri: str, target: Path, *, what: str) -> Path:
    """A local directory of `uri`: a file:// directory in place, anything else copied."""
    try:
        path = storage.local_path(uri)
    except storage.StorageError as error:
        raise CompressionError(f"{what}_unavailable", str(error), param=what) from None
    if path is not None:
        if not path.is_dir():
            raise CompressionError(f"{what}_unavailable", f"{what} not found: {uri}", param=what)
        return path
    try:
        storage.download_dir(uri, target)
    except FileNotFoundError:
        raise CompressionError(
            f"{what}_unavailable", f"nothing found at {uri}", param=what
        ) from None
    return target


def _require_safetensors(folder: Path, what: str, weights: str = "*.safetensors") -> None:
    try:
        safeload.require_safetensors(folder, what=what, weights=weights)
    except safeload.UnsafeWeights as error:
        raise CompressionError("unsafe_weights", str(error)) from None


def _source_dir(ref: SourceRef, task: str, target: Path, *, what: str) -> Path:
    base = _local(ref.uri, target, what=f"{what}_model")
    _require_safetensors(base, f"the {what} model")
    if ref.adapter_uri is None:
        return base
    adapter = _local(ref.adapter_uri, target.with_name(f"{what}-adapter"), what=f"{what}_adapter")
    _require_safetensors(adapter, f"the {what} adapter", "adapter_model.safetensors")
    merged = target.with_name(f"{what}-merged")
    _merge(base, adapter, merged, task=task, labels=ref.labels)
    return merged


def _merge(base: Path, adapter: Path, out: Path, *, task: str, labels: tuple[str, ...]) -> None:
    """Full weights of base + LoRA adapter at `out`, with the base's other files."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": torch.float32, **safeload.pretrained_kwargs()}
    if task == "causal_lm":
        model_class: Any = AutoModelForCausalLM
    elif task == "classification":
        model_class = AutoModelForSequenceClassification
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        pad = _tokenizer(base).pad_token_id
        if pad is not None:
            kwargs["pad_token_id"] = pad
    else:
        model_class = AutoModel
    model = model_class.from_pretrained(str(base), **kwargs)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CompressionError(
            "invalid_adapter", f"the adapter does not fit its base model: {error}"
        ) from None
    merged = peft_model.merge_and_unload()
    # The base's tokenizer, sentence-transformers modules and manifest come along;
    # its weights are replaced by the merged ones.
    shutil.copytree(
        base,
        out,
        ignore=lambda _dir, names: [
            n for n in names if n.endswith(".safetensors") or n == _WEIGHT_INDEX
        ],
    )
    merged.save_pretrained(str(out), safe_serialization=True)
    del model, peft_model, merged
    gc.collect()


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _require_result(out_dir: Path) -> None:
    # The method wrote this directory: a missing or pickled result is this worker's bug.
    if not (out_dir / "config.json").is_file():
        raise RuntimeError("the compression method wrote no config.json")
    safeload.require_safetensors(out_dir, what="the compressed model")


# -- rows ---------------------------------------------------------------------------------


def _rows(
    spec: CompressionSpec, ref: DataRef | None, tokenizer: Any, workdir: Path, what: str
) -> Rows:
    """The samples of a training, validation or test file; none without one."""
    if ref is None:
        return Rows([], [], [], 0)
    code = f"invalid_{what}_file"
    param = f"{what}_file"
    allowed = TASK_FORMATS[spec.task]
    if ref.format not in allowed:
        raise CompressionError(
            "invalid_spec",
            f"{spec.task} needs {what} data of format {', '.join(allowed)}, got {ref.format}",
            param=param,
        )
    local = workdir / f"{what}.jsonl"
    try:
        storage.download_file(ref.uri, local)
    except FileNotFoundError:
        raise CompressionError(
            code, f"the {what} file was not found: {ref.uri}", param=param
        ) from None
    maker = formats.SampleMaker(ref.format, tokenizer, spec.source.labels)
    texts: list[str] = []
    labels: list[int] = []
    indices: list[int] = []
    count = 0
    try:
        for index, (line_no, row) in enumerate(formats.rows(local, ref.format, code)):
            count = index + 1
            try:
                samples = maker.make(row)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                message = f"{what} file line {line_no}: {formats.reason(error, ref.format)}"
                raise CompressionError(code, message, param=param) from None
            for sample in samples:
                texts.append(sample.text)
                indices.append(index)
                if spec.task == "classification":
                    labels.append(sample.label)
    except TrainingError as error:
        raise CompressionError(error.code, error.message, param=param) from None
    finally:
        local.unlink(missing_ok=True)
    if not texts:
        raise CompressionError(code, f"the {what} file has no rows", param=param)
    return Rows(texts, labels, indices, count)


def held_out(
    spec: CompressionSpec, train: Rows, tokenizer: Any, workdir: Path
) -> tuple[Rows, Rows | None]:
    """(the rows the method may train on, the held-out test rows or None).

    A test file is read on its own; `test_fraction` moves the training rows
    `held_out_rows(rows, fraction, seed)` names (the control plane's count, the same on
    every attempt) out of the training rows and into the test rows.
    """
    if spec.test_data is not None:
        if spec.training_data is not None and spec.test_data.format != spec.training_data.format:
            raise CompressionError(
                "invalid_spec",
                f"test data must have the training data's format ({spec.training_data.format}), "
                f"got {spec.test_data.format}",
                param="test_file",
            )
        return train, _rows(spec, spec.test_data, tokenizer, workdir, "test")
    if spec.test_fraction <= 0:
        return train, None
    held = held_out_rows(train.count, spec.test_fraction, spec.seed)
    if not held:
        raise CompressionError(
            "invalid_training_file",
            f"test_fraction {spec.test_fraction} needs at least 2 training rows; the data "
            f"has {train.count}",
            param="test_fraction",
        )
    return train.select(lambda row: row not in held), train.select(lambda row: row in held)


# -- the report ---------------------------------------------------------------------------


def _report(
    spec: CompressionSpec, work: Work, device: torch.device, valid: Rows, test: Rows | None
) -> dict[str, Any]:
    texts, labels = valid.texts, valid.labels
    if texts:
        quality_data = "validation"
    elif spec.task == "classification":
        quality_data = "none"  # accuracy needs labelled rows; latency runs on built-in texts
    else:
        quality_data = "builtin"
    used = texts or list(measure.BUILTIN_TEXTS)
    source, result = measure.measure_pair(
        work.source_dir,
        work.out_dir,
        task=spec.task,
        device=device,
        texts=used,
        labels=labels,
        test_texts=test.texts if test is not None else (),
        test_labels=test.labels if test is not None else (),
    )
    held: dict[str, Any] = {}
    if test is not None:
        held = {
            "test_data": "test_file" if spec.test_data is not None else "test_fraction",
            "test_rows": min(len(test.texts), measure.MAX_TEST_ROWS),
        }
    return {
        "method": spec.method,
        "device": str(device),
        "dtype": str(measure.pick_dtype(device)).removeprefix("torch."),
        "quality_metric": measure.QUALITY_METRICS[spec.task],
        "quality_data": quality_data,
        "quality_rows": min(len(used), measure.MAX_QUALITY_TEXTS) if quality_data != "none" else 0,
        "peak_memory_method": measure.peak_memory_method(device),
        "options": dict(spec.options),
        "source": source,
        "result": result,
        "notes": _jsonable(work.notes),
        "ratios": measure.ratios(source, result),
        **held,
    }


def _test_metrics(report: dict[str, Any]) -> dict[str, Any] | None:
    """The result's test scores and how many rows they are over; None without test rows."""
    if "test_rows" not in report:
        return None
    scores = {k: v for k, v in report["result"].items() if k.startswith("test_")}
    return {**scores, "test_rows": report["test_rows"]}


def _jsonable(value: Any) -> Any:
    # Notes come from the methods; the report must cross the broker as JSON.
    return json.loads(json.dumps(value, default=str))


def _write_manifest(spec: CompressionSpec, work: Work, report: dict[str, Any]) -> None:
    out = work.out_dir
    family = spec.source.family
    config = out / "config.json"
    if config.is_file():
        family = str(json.loads(config.read_text()).get("model_type") or family)
    manifest = {
        "task": spec.task,
        "job": "compression",
        "method": spec.method,
        "artifact_kind": "full",
        "base_model": spec.source.name,
        "family": family,
        "labels": list(spec.source.labels),
        "job_id": spec.job_id,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
