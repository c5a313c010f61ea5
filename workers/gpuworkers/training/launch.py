"""Multi-device attempts through torch's own launcher.

Parent side (`run_distributed`, torch-free, runs in the Celery task): writes the
spec to a file and runs

    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m gpuworkers.training.launch spec.json

then forwards rank 0's reports (JSON lines in a file) to the real reporter,
numbering them itself, and maps the launcher's exit to an outcome. Rank side
(`main`, one per device): DDP over nccl (CUDA) or gloo (CPU); only rank 0 reports
and writes checkpoints and the artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import gpuworkers
from gpuworkers.training.control import (
    Heartbeat,
    Outcome,
    Reporter,
    ReportSender,
    SignalPoller,
    storage_signal_reader,
)
from gpuworkers.training.errors import StaleAttempt
from jobcontracts.training import FAILED, Report, TrainingSpec

REPORT_FILE_ENV = "ATELIER_REPORT_FILE"
OUTCOME_FILE_ENV = "ATELIER_OUTCOME_FILE"
FORWARD_EVERY_SECONDS = 0.2
LOG_TAIL_CHARS = 2000


def command(spec_path: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "gpuworkers.training.launch",
        str(spec_path),
    ]


def _env(nproc: int, reports: Path, outcome: Path) -> dict[str, str]:
    env = dict(os.environ)
    source_root = str(Path(gpuworkers.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    env[REPORT_FILE_ENV] = str(reports)
    env[OUTCOME_FILE_ENV] = str(outcome)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if "OMP_NUM_THREADS" not in env:
        # torchrun would set 1; on a CPU host share the cores among the ranks instead.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    return env


class _Forwarder:
    """Tails rank 0's report file and re-sends each complete line through `sender`."""

    def __init__(self, path: Path, sender: ReportSender) -> None:
        self.path = path
        self.sender = sender
        self.offset = 0
        self.seen = 0

    def forward(self) -> None:
        with self.path.open("rb") as stream:
            stream.seek(self.offset)
            chunk = stream.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            report = Report.from_json(json.loads(line))
            self.seen += 1
            self.sender.send(report.kind, report.data, at=report.at)


def run_distributed(spec: TrainingSpec, reporter: Reporter) -> Outcome:
    """Run the attempt on `spec.gpus` ranks in a subprocess; waits for it."""
    try:
        SignalPoller(spec, storage_signal_reader(spec.control_uri)).poll(force=True)
    except StaleAttempt:
        return Outcome("stale")
    sender = ReportSender(spec, reporter)
    heartbeat = Heartbeat(sender, spec.heartbeat_seconds)
    with tempfile.TemporaryDirectory(prefix=f"train-{spec.job_id}-") as tmp:
        folder = Path(tmp)
        spec_path, reports, outcome = folder / "spec.json", folder / "reports", folder / "outcome"
        spec_path.write_text(json.dumps(spec.to_json()))
        reports.touch()
        log = folder / "launcher.log"
        forwarder = _Forwarder(reports, sender)
        # Beat for the ranks while they start (importing torch takes seconds);
        # once rank 0 reports, its own heartbeat takes over.
        heartbeat.start("launching")
        with log.open("wb") as out:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                command(spec_path, spec.gpus),
                env=_env(spec.gpus, reports, outcome),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            while process.poll() is None:
                forwarder.forward()
                if forwarder.seen:
                    heartbeat.stop()
                time.sleep(FORWARD_EVERY_SECONDS)
            forwarder.forward()
        finally:
            heartbeat.stop()
            _stop(process)
        if outcome.exists():
            return Outcome(**json.loads(outcome.read_text()))
        tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        message = f"the training processes exited with code {process.returncode}: {tail}"
        sender.send(FAILED, {"code": "worker_crashed", "message": message, "retryable": True})
        return Outcome("failed", error_code="worker_crashed")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()  # torchrun passes it on to the ranks
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """One rank, started by torch's launcher."""
    from gpuworkers.reporting import file_reporter
    from gpuworkers.training.distributed import World
    from gpuworkers.training.engine import run_training

    args = sys.argv[1:] if argv is None else argv
    spec = TrainingSpec.from_json(json.loads(Path(args[0]).read_text()))
    world = World.from_env()
    world.init()
    reports = os.environ.get(REPORT_FILE_ENV)

    def discard(_: Report) -> None:
        pass

    reporter = file_reporter(Path(reports)) if reports and world.is_main else discard
    try:
        result = run_training(spec, reporter, world=world)
    finally:
        world.shutdown()
    outcome = os.environ.get(OUTCOME_FILE_ENV)
    if outcome and world.is_main:
        Path(outcome).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
