"""Pause, resume, cancel, stale attempts, heartbeats and actionable failures."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gpuworkers import storage
from gpuworkers.training.engine import run_training
from jobcontracts.training import Signal, TrainingSpec
from tests.gpuworkers.helpers import (
    CHAT_ROWS,
    PROMPT_COMPLETION_ROWS,
    Reports,
    ScriptedSignals,
    assert_no_pickle,
    assert_well_formed,
    final_dir,
    make_spec,
)

# Reads: 1 before loading, then one before each step (control_poll_seconds=0).
BEFORE_STEP = 1


def _weights(spec: TrainingSpec) -> dict[str, torch.Tensor]:
    final = final_dir(spec)
    name = "adapter_model.safetensors" if spec.adapter else "model.safetensors"
    return load_file(final / name)


@pytest.mark.parametrize(
    ("family", "fmt", "rows", "lora"),
    [
        ("llama", "chat", CHAT_ROWS, True),
        ("gpt2", "prompt_completion", PROMPT_COMPLETION_ROWS, False),  # dropout on
    ],
)
def test_pause_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, family: str, fmt: str, rows: list[dict[str, object]], lora: bool
) -> None:
    kwargs = dict(rows=rows, fmt=fmt, family=family, repeat=3, n_epochs=2, batch_size=2)
    if not lora:
        kwargs["adapter"] = None
    straight = make_spec(tmp_path / "straight", **kwargs)  # type: ignore[arg-type]
    whole = run_training(straight, Reports(), signal_reader=lambda: None)
    assert whole.status == "succeeded"
    assert whole.step == 10

    spec = make_spec(tmp_path / "paused", **kwargs)  # type: ignore[arg-type]
    signals = ScriptedSignals(*[None] * (BEFORE_STEP + 4), Signal(1, "pause"))
    first = Reports()
    paused = run_training(spec, first, signal_reader=signals)

    assert paused.status == "paused"
    assert_well_formed(first, final="paused")
    assert first.kinds()[-2:] == ["checkpoint", "paused"]
    pause = first.one("paused").data
    assert pause["step"] == 4
    assert pause["checkpoint_uri"] == spec.output_uri + "/checkpoints/step-00000004"
    assert first.one("checkpoint").data["uri"] == pause["checkpoint_uri"]
    checkpoint = Path(pause["checkpoint_uri"].removeprefix("file://"))
    names = assert_no_pickle(checkpoint)
    assert {"optimizer.safetensors", "trainer_state.json", "tokenizer.json"} <= set(names)
    assert ("adapter_model.safetensors" if lora else "model.safetensors") in names
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert state["total_steps"] == 10
    assert state["trained_tokens"] == paused.trained_tokens > 0
    with safe_open(str(checkpoint / "optimizer.safetensors"), framework="pt") as handle:
        assert any(key.endswith(".exp_avg_sq") for key in handle.keys())  # noqa: SIM118
        assert "last_epoch" in json.loads(handle.metadata()["scheduler"])

    # The control plane starts attempt 2 from the checkpoint.
    resumed_spec = dataclasses.replace(spec, attempt=2, resume_from=pause["checkpoint_uri"])
    second = Reports()
    resumed = run_training(resumed_spec, second, signal_reader=lambda: Signal(2, "run"))

    assert resumed.status == "succeeded"
    assert_well_formed(second, final="succeeded")
    assert {r.attempt for r in second.items} == {2}
    assert second.one("started").data["resumed_from_step"] == 4
    assert second.one("started").data["total_steps"] == 10
    assert second.of("progress")[0].data["step"] == 5
    assert resumed.step == whole.step == 10
    assert resumed.trained_tokens == whole.trained_tokens
    assert second.one("succeeded").data["trained_tokens"] == whole.trained_tokens
    expected, got = _weights(straight), _weights(resumed_spec)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_checkpoints_every_n_steps_are_reported_with_metrics(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        repeat=2,
        n_epochs=2,
        batch_size=2,
        checkpoint_every_steps=2,
        eval_every_steps=3,
        valid_rows=CHAT_ROWS,
    )
    reports = Reports()

    run_training(spec, reports, signal_reader=lambda: None)

    # 6 steps: checkpoints at 2 and 4 (the last step gets the final artifact instead).
    checkpoints = reports.of("checkpoint")
    assert [c.data["step"] for c in checkpoints] == [2, 4]
    assert [m.data["step"] for m in reports.of("metrics")] == [3, 6]
    assert "valid_loss" in checkpoints[1].data["metrics"]
    assert storage.list_names(spec.output_uri + "/checkpoints") == sorted(
        f"step-{s:08d}/{name}"
        for s in (2, 4)
        for name in storage.list_names(f"{spec.output_uri}/checkpoints/step-{s:08d}")
    )


def test_cancel_signal_stops_at_the_next_step_boundary(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, repeat=4, n_epochs=3)
    reports = Reports()
    signals = ScriptedSignals(None, None, None, Signal(1, "cancel"))

    outcome = run_training(spec, reports, signal_reader=signals)

    assert outcome.status == "cancelled"
    assert_well_formed(reports, final="cancelled")
    assert reports.one("cancelled").data == {"step": 2}
    assert not final_dir(spec).exists()


def test_cancel_read_from_storage_within_the_poll_interval(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, repeat=4, n_epochs=3, control_poll_seconds=0.5)
    storage.write_bytes(spec.control_uri, Signal(1, "cancel").to_bytes())
    reports = Reports()

    outcome = run_training(spec, reports)  # the default reader: the signal in storage

    assert outcome.status == "cancelled"
    assert reports.kinds()[-1] == "cancelled"


def test_a_stale_attempt_stops_silently(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, repeat=4, n_epochs=3)
    reports = Reports()
    # After two steps the lease expired and attempt 2 took over.
    signals = ScriptedSignals(None, None, None, Signal(2, "run"))

    outcome = run_training(spec, reports, signal_reader=signals)

    assert outcome.status == "stale"
    assert_well_formed(reports, final=None)
    assert reports.kinds()[-1] == "progress"
    assert outcome.step == 2
    count = len(reports.items)
    time.sleep(0.3)
    assert len(reports.items) == count
    assert not final_dir(spec).exists()


def test_a_superseded_attempt_does_not_even_start(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    reports = Reports()

    outcome = run_training(spec, reports, signal_reader=lambda: Signal(3, "run"))

    assert outcome.status == "stale"
    assert reports.items == []


def test_heartbeats_cover_model_loading_and_stop_after_the_final_report(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, heartbeat_seconds=0.02, repeat=4, n_epochs=2)
    reports = Reports()
    slow = {"reads": 0}

    def slow_reader() -> None:
        slow["reads"] += 1
        time.sleep(0.05)  # silent for longer than heartbeat_seconds

    outcome = run_training(spec, reports, signal_reader=slow_reader)

    assert outcome.status == "succeeded"
    assert_well_formed(reports, final="succeeded")
    beats = reports.of("heartbeat")
    assert beats, reports.kinds()
    assert {b.data["phase"] for b in beats} <= {"loading", "training", "evaluating", "uploading"}
    count = len(reports.items)
    time.sleep(0.2)
    assert len(reports.items) == count


def test_progress_is_throttled_but_first_and_last_steps_are_always_reported(
    tmp_path: Path,
) -> None:
    spec = make_spec(tmp_path, repeat=4, n_epochs=2, batch_size=1)
    reports = Reports()

    run_training(spec, reports, signal_reader=lambda: None)

    steps = [r.data["step"] for r in reports.of("progress")]
    assert steps[0] == 1
    assert steps[-1] == 24
    assert len(steps) < 24
    progress = reports.of("progress")[-1].data
    assert set(progress) == {
        "step",
        "total_steps",
        "epoch",
        "train_loss",
        "learning_rate",
        "tokens_per_second",
        "eta_seconds",
        "trained_tokens",
    }
    assert progress["epoch"] == 2


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"messages": []}\n', "line 1"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "assistant"),
        ("\n\n", "no rows"),
        ('{"prompt": "a", "completion": "b"}\nnot json\n', "line 2: not JSON"),
        ('{"prompt": "a"}\n', "completion"),
    ],
)
def test_a_bad_training_file_fails_with_an_actionable_code(
    tmp_path: Path, content: str, needle: str
) -> None:
    fmt = "chat" if "messages" in content else "prompt_completion"
    spec = make_spec(tmp_path, fmt=fmt)
    Path(spec.training_data.uri.removeprefix("file://")).write_text(content)
    reports = Reports()

    outcome = run_training(spec, reports, signal_reader=lambda: None)

    assert outcome.status == "failed"
    assert_well_formed(reports, final="failed")
    failed = reports.one("failed").data
    assert failed["code"] == "invalid_training_file"
    assert failed["retryable"] is False
    assert needle in failed["message"]
    assert "started" not in reports.kinds()


def test_an_unknown_label_names_the_label_and_the_line(tmp_path: Path) -> None:
    rows = [{"text": "good", "label": "positive"}, {"text": "meh", "label": "neutral"}]
    spec = make_spec(
        tmp_path,
        rows=rows,
        fmt="classification",
        task="classification",
        labels=("negative", "positive"),
    )
    reports = Reports()

    run_training(spec, reports, signal_reader=lambda: None)

    failed = reports.one("failed").data
    assert failed["code"] == "invalid_training_file"
    assert "line 2" in failed["message"]
    assert "'neutral'" in failed["message"]


def test_missing_training_file_and_bad_hyperparameters_are_not_retryable(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    missing = dataclasses.replace(
        spec,
        training_data=dataclasses.replace(spec.training_data, uri=f"file://{tmp_path}/nope.jsonl"),
    )
    reports = Reports()
    run_training(missing, reports, signal_reader=lambda: None)
    assert reports.one("failed").data["code"] == "invalid_training_file"

    bad = dataclasses.replace(
        spec, hyperparameters=dataclasses.replace(spec.hyperparameters, batch_size=0)
    )
    reports = Reports()
    run_training(bad, reports, signal_reader=lambda: None)
    failed = reports.one("failed").data
    assert failed == {
        "code": "invalid_hyperparameters",
        "message": "batch_size must be at least 1",
        "retryable": False,
    }


def test_an_unexpected_error_is_reported_retryable_and_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpuworkers.training import loop

    def explode(self: loop.Trainer) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(loop.Trainer, "train_step", explode)
    spec = make_spec(tmp_path)
    reports = Reports()

    with pytest.raises(RuntimeError, match="disk on fire"):
        run_training(spec, reports, signal_reader=lambda: None)

    assert_well_formed(reports, final="failed")
    assert reports.one("failed").data == {
        "code": "internal_error",
        "message": "RuntimeError: disk on fire",
        "retryable": True,
    }


def test_an_unreadable_signal_does_not_stop_the_job(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    reports = Reports()

    def broken_reader() -> None:
        raise OSError("storage hiccup")

    outcome = run_training(spec, reports, signal_reader=broken_reader)

    assert outcome.status == "succeeded"


def test_pause_before_the_first_step_checkpoints_step_0_and_resumes_from_it(
    tmp_path: Path,
) -> None:
    straight = make_spec(tmp_path / "straight", n_epochs=2)
    whole = run_training(straight, Reports(), signal_reader=lambda: None)
    spec = make_spec(tmp_path / "paused", n_epochs=2)
    reports = Reports()

    paused = run_training(spec, reports, signal_reader=lambda: Signal(1, "pause"))

    assert paused.status == "paused"
    assert reports.kinds() == ["started", "checkpoint", "paused"]
    assert reports.one("paused").data["step"] == 0
    step_0 = spec.output_uri + "/checkpoints/step-00000000"
    assert paused.checkpoint_uri == step_0

    # Attempt 2 is paused again before it trains: it points at the same checkpoint
    # and writes nothing over it.
    second_spec = dataclasses.replace(spec, attempt=2, resume_from=step_0)
    second = Reports()
    again = run_training(second_spec, second, signal_reader=lambda: Signal(2, "pause"))
    assert again.checkpoint_uri == step_0
    assert second.kinds() == ["started", "paused"]

    third_spec = dataclasses.replace(spec, attempt=3, resume_from=step_0)
    done = run_training(third_spec, Reports(), signal_reader=lambda: None)
    assert done.status == "succeeded"
    assert done.trained_tokens == whole.trained_tokens
    expected, got = _weights(straight), _weights(third_spec)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_checkpoints_by_elapsed_time(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, n_epochs=2, checkpoint_every_seconds=1e-6)
    reports = Reports()

    run_training(spec, reports, signal_reader=lambda: None)

    # Every step but the last (which writes the final artifact) is a checkpoint.
    assert [c.data["step"] for c in reports.of("checkpoint")] == [1, 2, 3]
