"""Reports out (numbered, never after the last), heartbeats, and control signals in.

Torch-free: the Celery task module imports this without loading a model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpuworkers import storage
from gpuworkers.training.errors import StaleAttempt
from jobcontracts.training import FINAL_KINDS, HEARTBEAT, RUN, Report, Signal

log = logging.getLogger(__name__)

Reporter = Callable[[Report], None]
SignalReader = Callable[[], "Signal | None"]


class AttemptSpec(Protocol):
    """What reporting and signal polling need of a job attempt's spec: a fine-tuning
    `TrainingSpec` and a `CompressionSpec` both have it."""

    @property
    def job_id(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def control_poll_seconds(self) -> float: ...


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: succeeded | failed | paused | cancelled | stale."""

    status: str
    step: int = 0
    trained_tokens: int = 0
    artifact_uri: str | None = None
    checkpoint_uri: str | None = None
    error_code: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class ReportSender:
    """Numbers an attempt's reports 0, 1, 2, … and sends nothing after a final one.

    Thread-safe: the heartbeat thread and the training loop share it; the lock is
    held while sending, so reports leave in `seq` order.
    """

    def __init__(self, spec: AttemptSpec, reporter: Reporter, *, enabled: bool = True) -> None:
        self._spec = spec
        self._reporter = reporter
        self._enabled = enabled  # only rank 0 of a distributed run reports
        self._lock = threading.Lock()
        self._seq = 0
        self.closed = False
        self.last_sent = time.monotonic()

    def send(self, kind: str, data: dict[str, Any], *, at: float | None = None) -> bool:
        with self._lock:
            if self.closed:
                return False
            if kind in FINAL_KINDS:
                self.closed = True
            if not self._enabled:
                return False
            report = Report(
                job_id=self._spec.job_id,
                attempt=self._spec.attempt,
                seq=self._seq,
                kind=kind,
                at=time.time() if at is None else at,
                data=data,
            )
            self._seq += 1
            self.last_sent = time.monotonic()
            self._reporter(report)
            return True

    def close(self) -> None:
        """Stop reporting without a final report (a stale attempt)."""
        with self._lock:
            self.closed = True


class Heartbeat:
    """Sends `heartbeat {"phase"}` whenever the attempt has been silent for `every`
    seconds, so the control plane's lease sees it alive through model loading,
    evaluation and uploads. Progress reports reset the clock."""

    def __init__(self, sender: ReportSender, every: float) -> None:
        self.sender = sender
        self.every = max(every, 0.01)
        self.phase = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-heartbeat", daemon=True)

    def start(self, phase: str) -> None:
        self.phase = phase
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self.sender.closed:
            delay = self.sender.last_sent + self.every - time.monotonic()
            if delay <= 0:
                try:
                    self.sender.send(HEARTBEAT, {"phase": self.phase})
                except Exception:  # a broker hiccup must not kill the beat
                    log.exception("training.heartbeat_failed")
                delay = self.every
            if self._stop.wait(delay):
                return


def storage_signal_reader(uri: str) -> SignalReader:
    """Reads the control plane's `Signal` at `uri`; None when none is written yet."""

    def read() -> Signal | None:
        raw = storage.read_bytes(uri)
        return None if raw is None else Signal.from_bytes(raw)

    return read


class SignalPoller:
    """Checked at every step boundary; reads storage at most every `control_poll_seconds`."""

    def __init__(self, spec: AttemptSpec, reader: SignalReader) -> None:
        self._attempt = spec.attempt
        self._every = spec.control_poll_seconds
        self._reader = reader
        self._next = 0.0
        self._last = RUN

    def poll(self, *, force: bool = False) -> str:
        """RUN, PAUSE or CANCEL; raises StaleAttempt when another attempt owns the job.

        Between reads it answers what it read last: a signal holds until it changes.
        """
        now = time.monotonic()
        if not force and now < self._next:
            return self._last
        self._next = now + self._every
        try:
            signal = self._reader()
        except Exception:
            # A storage hiccup must not fail a long job; the lease covers a lost worker.
            log.warning("training.signal_unreadable", exc_info=True)
            return self._last
        if signal is not None and signal.attempt != self._attempt:
            raise StaleAttempt(f"signal is for attempt {signal.attempt}")
        self._last = RUN if signal is None else signal.action
        return self._last
