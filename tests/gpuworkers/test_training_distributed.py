"""`spec.gpus > 1`: the task's launch path runs torch's launcher (here: 2 CPU ranks, gloo)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpuworkers import storage
from gpuworkers.training import launch
from gpuworkers.training.task import execute
from jobcontracts.training import Signal
from tests.gpuworkers.helpers import (
    CHAT_ROWS,
    Reports,
    assert_no_pickle,
    assert_well_formed,
    final_dir,
    make_spec,
)


@pytest.mark.slow
def test_two_ranks_train_exactly_like_one_process(tmp_path: Path) -> None:
    # 7 rows, batches of 3: the ranks get 2+1 rows, and the last batch (1 row) leaves
    # rank 1 empty-handed. The gradient must still be the whole batch's.
    common = dict(
        rows=CHAT_ROWS * 2 + CHAT_ROWS[:1],
        n_epochs=2,
        batch_size=3,
        valid_rows=CHAT_ROWS,
        checkpoint_every_steps=2,
    )
    single = make_spec(tmp_path / "one", **common)  # type: ignore[arg-type]
    one = execute(single, Reports(), signal_reader=lambda: None)
    assert one.status == "succeeded"

    spec = dataclasses.replace(make_spec(tmp_path / "two", **common), gpus=2)  # type: ignore[arg-type]
    reports = Reports()
    two = execute(spec, reports)

    assert two.status == "succeeded", reports.of("failed")
    assert_well_formed(reports, final="succeeded")
    started = reports.one("started").data
    assert started["world_size"] == 2
    assert started["total_steps"] == 6
    assert two.step == one.step == 6
    assert two.trained_tokens == one.trained_tokens
    assert [c.data["step"] for c in reports.of("checkpoint")] == [2, 4]
    assert two.metrics["valid_loss"] == pytest.approx(one.metrics["valid_loss"], abs=1e-5)
    expected = load_file(final_dir(single) / "adapter_model.safetensors")
    got = load_file(final_dir(spec) / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)
    assert_no_pickle(Path(spec.output_uri.removeprefix("file://")))


def test_a_crashed_launch_is_reported_failed_and_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crashing(spec_path: Path, nproc: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('rank 0 segfaulted'); sys.exit(7)"]

    monkeypatch.setattr(launch, "command", crashing)
    spec = dataclasses.replace(make_spec(tmp_path), gpus=2)
    reports = Reports()

    outcome = execute(spec, reports)

    assert outcome.status == "failed"
    assert_well_formed(reports, final="failed")
    failed = reports.one("failed").data
    assert failed["code"] == "worker_crashed"
    assert failed["retryable"] is True
    assert "exited with code 7" in failed["message"]
    assert "rank 0 segfaulted" in failed["message"]


def test_a_stale_multi_device_attempt_launches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(spec_path: Path, nproc: int) -> list[str]:
        raise AssertionError("launched a stale attempt")

    monkeypatch.setattr(launch, "command", never)
    spec = dataclasses.replace(make_spec(tmp_path), gpus=2)
    storage.write_bytes(spec.control_uri, Signal(2, "run").to_bytes())
    reports = Reports()

    outcome = execute(spec, reports)

    assert outcome.status == "stale"
    assert reports.items == []
