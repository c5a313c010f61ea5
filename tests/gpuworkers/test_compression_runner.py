"""One compression attempt in process (`runner.run_compression`), and its Celery task.

Tiny local models, file:// storage in tmp dirs, a reporter that keeps what it is sent and
a signal reader each test controls.
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpuworkers.compression import measure, quantized, runner
from gpuworkers.compression.context import Work
from jobcontracts import queues
from jobcontracts.compression import QUANTIZATION_FILE, CompressionSpec, SourceRef
from jobcontracts.training import CANCEL, DataRef, Report, Signal
from tests.gpuworkers.helpers import (
    CLASSIFICATION_ROWS,
    TEXT_LINES,
    Reports,
    ScriptedSignals,
    assert_no_pickle,
    assert_well_formed,
    write_jsonl,
    write_text,
)
from tests.support.models import minilm_dir, tiny_model_dir

MEASURES = {
    "parameters",
    "file_bytes",
    "peak_memory_bytes",
    "latency_ms_p50_batch1",
    "latency_ms_p50_batch16",
    "quality",
}


@pytest.fixture(autouse=True)
def workroot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The attempt's workdir is made here, so a test can see it removed afterwards.
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    return work


@pytest.fixture
def quick_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """One warm-up and one timed forward: for tests about something other than latency."""
    monkeypatch.setattr(measure, "WARMUP", 1)
    monkeypatch.setattr(measure, "REPS_BATCH1", 1)
    monkeypatch.setattr(measure, "REPS_BATCH16", 1)


def make_spec(
    tmp: Path,
    *,
    method: str,
    options: dict[str, Any],
    task: str = "causal_lm",
    source: SourceRef | None = None,
    train: list[str] | None = None,
    valid: list[str] | None = TEXT_LINES,
    **overrides: Any,
) -> CompressionSpec:
    fields: dict[str, Any] = {
        "job_id": "cmpjob-test",
        "attempt": 1,
        "organization_id": "org-test",
        "task": task,
        "method": method,
        "source": source or SourceRef("tiny-llama", f"file://{tiny_model_dir('llama')}", "llama"),
        "options": options,
        "output_uri": f"file://{tmp}/out",
        "control_uri": f"file://{tmp}/control/signal.json",
        "training_data": None
        if train is None
        else DataRef(write_text(tmp / "data" / "train.txt", train), "text"),
        "validation_data": None
        if valid is None
        else DataRef(write_text(tmp / "data" / "valid.txt", valid), "text"),
        "heartbeat_seconds": 30.0,
        "control_poll_seconds": 0.0,
    }
    fields.update(overrides)
    spec = CompressionSpec(**fields)
    spec.check()
    return spec


def final_dir(tmp: Path) -> Path:
    return tmp / "out" / "final"


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def workdirs(tmp: Path) -> list[Path]:
    # torch keeps caches of its own there (torchinductor_<user>).
    return sorted(tmp.glob("compress-*"))


def without_heartbeats(reports: Reports) -> list[str]:
    return [kind for kind in reports.kinds() if kind != "heartbeat"]


def hf_perplexity(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """Perplexity by transformers' own loss: every real token after the first, predicted."""
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**encoded, labels=labels).loss
    return math.exp(float(loss))


def test_quantize_reports_started_to_succeeded_with_the_artifact_and_every_measure(
    tmp_path: Path, workroot: Path
) -> None:
    spec = make_spec(
        tmp_path, method="quantize", options={"weights": "int8"}, heartbeat_seconds=0.2
    )
    reports = Reports()

    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))

    assert outcome.status == "succeeded", reports.items[-1].data
    assert_well_formed(reports, final="succeeded")
    assert reports.items[0].kind == "started"
    # Silent phases keep the lease alive, each named (measuring takes seconds).
    phases = {r.data["phase"] for r in reports.of("heartbeat")}
    assert "measuring" in phases
    assert phases <= {"loading", "compressing", "measuring", "uploading"}
    assert reports.items[0].data == {"device": "cpu", "method": "quantize", "total_steps": 0}
    final = final_dir(tmp_path)
    done = reports.one("succeeded").data
    assert done["artifact_uri"] == f"{spec.output_uri}/final" == outcome.artifact_uri
    assert done["artifact_kind"] == "full"
    assert done["artifact_files"] == assert_no_pickle(final)
    assert quantized.is_quantized(final)
    assert (final / QUANTIZATION_FILE).is_file()
    report = done["report"]
    assert report["method"] == "quantize"
    assert report["device"] == "cpu"
    assert report["quality_metric"] == "perplexity"
    assert report["quality_data"] == "validation"
    assert report["options"] == {"weights": "int8"}
    assert report["notes"]["quantization"]["weights"] == "int8"
    source, result = report["source"], report["result"]
    for measures in (source, result):
        assert set(measures) == MEASURES
        assert all(value > 0 for value in measures.values()), measures
    # Sizes as the files are; int8 keeps every weight in a quarter of the bytes (+ scales).
    assert source["file_bytes"] == safetensors_bytes(tiny_model_dir("llama"))
    assert result["file_bytes"] == safetensors_bytes(final)
    assert result["parameters"] == source["parameters"]
    assert result["file_bytes"] < 0.35 * source["file_bytes"]
    assert 1 < source["quality"] < 10_000
    assert result["quality"] == pytest.approx(source["quality"], rel=0.05)
    assert report["ratios"]["size"] == pytest.approx(
        result["file_bytes"] / source["file_bytes"], abs=1e-4
    )
    assert set(report["ratios"]) == {"size", "speed_batch1", "speed_batch16", "quality"}
    assert workdirs(workroot) == []  # the workdir is gone
    print("quantize int8 tiny-llama:", source, result, report["ratios"])  # pytest -s


def _cancel_after(reports: Reports, progress: int) -> Callable[[], Signal | None]:
    return lambda: Signal(1, CANCEL) if len(reports.of("progress")) >= progress else None


def test_a_cancel_signal_during_recovery_stops_the_attempt_and_uploads_nothing(
    tmp_path: Path, workroot: Path
) -> None:
    spec = make_spec(
        tmp_path,
        method="prune",
        options={"sparsity": 0.5, "recovery_steps": 50, "batch_size": 2},
        train=TEXT_LINES * 4,
    )
    reports = Reports()

    # Progress goes out at most once a second (and on the first and last step): the
    # cancel is read at the step after the first report.
    outcome = runner.run_compression(spec, reports, signal_reader=_cancel_after(reports, 1))

    assert outcome.status == "cancelled"
    assert_well_formed(reports, final="cancelled")
    assert without_heartbeats(reports) == ["started", "progress", "cancelled"]
    assert reports.items[0].data["total_steps"] == 50
    first = reports.of("progress")[0].data
    assert first["step"] == 1
    assert first["total_steps"] == 50
    assert first["phase"] == "compressing"
    assert isinstance(first["train_loss"], float)
    assert reports.one("cancelled").data == {"step": 2}
    assert not (tmp_path / "out").exists()
    assert workdirs(workroot) == []


def test_a_stale_attempt_stops_quietly(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        method="prune",
        options={"sparsity": 0.5, "recovery_steps": 50, "batch_size": 2},
        train=TEXT_LINES * 4,
    )
    # Superseded before it starts: not a word, not even `started`.
    early = Reports()
    outcome = runner.run_compression(spec, early, signal_reader=ScriptedSignals(Signal(2)))
    assert outcome.status == "stale"
    assert early.items == []

    reports = Reports()

    def newer_attempt_after_first_step() -> Signal | None:
        return Signal(2) if reports.of("progress") else Signal(1)

    outcome = runner.run_compression(spec, reports, signal_reader=newer_attempt_after_first_step)

    assert outcome.status == "stale"
    assert_well_formed(reports, final=None)
    assert without_heartbeats(reports) == ["started", "progress"]
    assert not (tmp_path / "out").exists()


def test_what_the_user_can_fix_fails_without_retry(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, method="prune", options={"target": "layers"})  # no sparsity
    reports = Reports()

    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))

    assert outcome.status == "failed"
    assert outcome.error_code == "invalid_options"
    assert_well_formed(reports, final="failed")
    failed = reports.one("failed").data
    assert failed["code"] == "invalid_options"
    assert failed["param"] == "sparsity"
    assert failed["retryable"] is False
    assert "sparsity is required" in failed["message"]
    assert not (tmp_path / "out").exists()

    # A bad row in a data file is named by line, before any model is loaded.
    chat_rows = [{"messages": [{"role": "user", "content": "hi"}]}, "not json"]
    bad = DataRef(write_jsonl(tmp_path / "data" / "bad.jsonl", chat_rows), "chat")
    spec = make_spec(tmp_path, method="quantize", options={}, validation_data=bad)
    reports = Reports()

    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))

    failed = reports.one("failed").data
    assert outcome.error_code == failed["code"] == "invalid_validation_file"
    assert failed["message"].startswith("validation file line 1:")
    assert failed["param"] == "validation_file"
    assert failed["retryable"] is False


def _broken_method(work: Work) -> None:
    raise RuntimeError(f"bug in {work.method}")


def test_an_unexpected_error_is_reported_retryable_and_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workroot: Path
) -> None:
    hook = f"{__name__}:_broken_method"
    monkeypatch.setitem(runner.METHODS, "quantize", hook)
    spec = make_spec(tmp_path, method="quantize", options={})
    reports = Reports()

    with pytest.raises(RuntimeError, match="bug in quantize"):
        runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))

    assert_well_formed(reports, final="failed")
    failed = reports.one("failed").data
    assert failed["code"] == "internal_error"
    assert failed["retryable"] is True
    assert workdirs(workroot) == []


def test_a_lora_source_is_merged_before_it_is_compressed(
    tmp_path: Path, quick_latency: None
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_model_dir("llama")
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,  # random B: the adapter changes what the model says
        task_type="CAUSAL_LM",
    )
    adapted = get_peft_model(base, lora)
    adapted.eval()
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    with_adapter = hf_perplexity(adapted, tokenizer, TEXT_LINES)
    with adapted.disable_adapter():
        without = hf_perplexity(adapted, tokenizer, TEXT_LINES)
    assert abs(with_adapter - without) > 0.01 * without
    source = SourceRef(
        "tiny-llama-ft", f"file://{base_dir}", "llama", adapter_uri=f"file://{adapter_dir}"
    )
    spec = make_spec(tmp_path, method="quantize", options={"weights": "int8"}, source=source)
    reports = Reports()

    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))

    assert outcome.status == "succeeded", reports.items[-1].data
    report = reports.one("succeeded").data["report"]
    # The source measured is base + adapter, merged.
    assert report["source"]["quality"] == pytest.approx(with_adapter, rel=1e-3)
    assert report["result"]["quality"] == pytest.approx(with_adapter, rel=0.05)
    names = assert_no_pickle(final_dir(tmp_path))
    assert not any(name.startswith("adapter") for name in names)


def test_a_classifier_is_measured_by_accuracy_and_f1(tmp_path: Path, quick_latency: None) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = ("negative", "positive")
    classifier_dir = tmp_path / "classifier"
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir("llama")),
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=3,
    )
    model.eval()
    model.save_pretrained(str(classifier_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    tokenizer.save_pretrained(str(classifier_dir))
    texts = [row["text"] for row in CLASSIFICATION_ROWS]
    truth = [labels.index(str(row["label"])) for row in CLASSIFICATION_ROWS]
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(dim=-1).tolist()
    expected = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    valid = DataRef(
        write_jsonl(tmp_path / "data" / "valid.jsonl", CLASSIFICATION_ROWS), "classification"
    )
    spec = make_spec(
        tmp_path,
        method="quantize",
        options={"weights": "int8"},
        task="classification",
        source=SourceRef("tiny-cls", f"file://{classifier_dir}", "llama", labels=labels),
        validation_data=valid,
    )
    reports = Reports()

    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))

    assert outcome.status == "succeeded", reports.items[-1].data
    report = reports.one("succeeded").data["report"]
    assert report["quality_metric"] == "accuracy"
    assert report["quality_rows"] == len(texts)
    assert report["source"]["quality"] == pytest.approx(expected, abs=1e-4)
    for side in ("source", "result"):
        assert set(report[side]) == MEASURES | {"f1"}
        assert 0 <= report[side]["f1"] <= 1


def test_an_embedding_model_without_validation_rows_is_compared_on_built_in_texts(
    tmp_path: Path, quick_latency: None
) -> None:
    source = SourceRef("all-minilm-l6-v2", f"file://{minilm_dir()}", "bert")
    spec = make_spec(
        tmp_path,
        method="quantize",
        options={"weights": "int8"},
        task="embeddings",
        source=source,
        valid=None,
    )
    reports = Reports()

    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))

    assert outcome.status == "succeeded", reports.items[-1].data
    report = reports.one("succeeded").data["report"]
    assert report["quality_metric"] == "cosine_to_source"
    assert report["quality_data"] == "builtin"
    assert report["quality_rows"] == len(measure.BUILTIN_TEXTS) >= 30
    assert report["source"]["quality"] == 1.0
    assert 0.9 < report["result"]["quality"] < 1.0
    assert report["result"]["file_bytes"] < 0.35 * report["source"]["file_bytes"]
    # Every weight is still there (MiniLM's file also holds int64 position ids: not weights).
    assert report["result"]["parameters"] == report["source"]["parameters"] == 22_713_216
    final = final_dir(tmp_path)
    assert (final / "modules.json").is_file()
    assert (final / "1_Pooling" / "config.json").is_file()
    print("quantize int8 MiniLM:", report["source"], report["result"], report["ratios"])


def test_the_celery_task_reports_an_invalid_spec_to_the_control_queue() -> None:
    from kombu import Exchange, Queue

    from gpuworkers.celery import app
    from gpuworkers.compression.task import run

    job_id = f"cmpjob-{uuid.uuid4().hex[:12]}"
    answer = run({"job_id": job_id, "attempt": 1, "task": "causal_lm", "method": "shrink"})

    assert answer == {"status": "failed", "error_code": "invalid_spec"}
    found: list[Report] = []
    queue = Queue(queues.CONTROL, Exchange(queues.CONTROL), routing_key=queues.CONTROL)
    deadline = time.monotonic() + 20
    with app.connection_for_read() as connection, connection.SimpleQueue(queue) as control:
        while not found and time.monotonic() < deadline:
            try:
                message = control.get(timeout=1)
            except control.Empty:
                continue
            message.ack()
            if message.headers.get("task") != queues.CONTROL_JOB_REPORT:
                continue
            args, _kwargs, _embed = message.decode()
            report = Report.from_json(args[0])
            if report.job_id == job_id:
                found.append(report)
    assert len(found) == 1, "no report reached the control queue"
    failed = found[0]
    assert (failed.seq, failed.kind, failed.attempt) == (0, "failed", 1)
    assert failed.data["code"] == "invalid_spec"
    assert failed.data["retryable"] is False


def test_the_worker_registers_the_compression_task_on_its_queue(tmp_path: Path) -> None:
    from tests.gpuworkers.helpers import UNREACHED_REDIS, run_bare_worker_python

    code = """
import sys
from gpuworkers.celery import app
app.loader.import_default_modules()  # what the worker does at start: `include`
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
assert not heavy, heavy
task = app.tasks["gpuworkers.compression.run"]
assert task.acks_late is False
assert task.reject_on_worker_lost is False
assert task.ignore_result is True
route = app.amqp.router.route({}, "gpuworkers.compression.run")
assert route["queue"].name == "gpu.compression", route
print("ok")
"""
    done = run_bare_worker_python(code, tmp_path, REDIS_URL=UNREACHED_REDIS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
