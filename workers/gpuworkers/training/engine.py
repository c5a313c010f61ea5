"""One attempt of a fine-tuning job, in process: `run_training(spec, reporter)`.

Testable without Celery: `reporter` is any callable taking `Report`s and
`signal_reader` any callable returning the current `Signal` (or None).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpuworkers import metrics, storage
from gpuworkers.training import data, formats, modeling
from gpuworkers.training.control import (
    Heartbeat,
    Outcome,
    Reporter,
    ReportSender,
    SignalPoller,
    SignalReader,
    storage_signal_reader,
)
from gpuworkers.training.distributed import World, cpu_threads
from gpuworkers.training.errors import StaleAttempt, TrainingError
from gpuworkers.training.loop import Trainer
from jobcontracts.training import (
    CANCEL,
    CANCELLED,
    FAILED,
    PAUSE,
    PAUSED,
    RUN,
    TrainingSpec,
    held_out_rows,
)

log = logging.getLogger(__name__)

_ACTIONS = (RUN, PAUSE, CANCEL, "stale")
__all__ = ["Outcome", "run_training"]


def run_training(
    spec: TrainingSpec,
    reporter: Reporter,
    *,
    signal_reader: SignalReader | None = None,
    world: World | None = None,
) -> Outcome:
    """Run one attempt to its end and report it; never raises for what a user can fix.

    A `TrainingError` (bad file, bad spec, out of memory) is reported as `failed`
    with its code and returned; anything unexpected is reported as `failed`
    (retryable) and re-raised. A stale attempt returns quietly.
    """
    world = world or World()
    sender = ReportSender(spec, reporter, enabled=world.is_main)
    poller = SignalPoller(spec, signal_reader or storage_signal_reader(spec.control_uri))
    heartbeat = Heartbeat(sender, spec.heartbeat_seconds)
    workdir = Path(tempfile.mkdtemp(prefix=f"train-{spec.job_id}-"))
    trainer: Trainer | None = None

    def control(*, force: bool = False) -> str:
        # Rank 0 reads the signal; every rank acts on its decision together.
        code = 0
        if world.is_main:
            try:
                code = _ACTIONS.index(poller.poll(force=force))
            except StaleAttempt:
                code = _ACTIONS.index("stale")
        action = _ACTIONS[world.broadcast(code)]
        if action == "stale":
            raise StaleAttempt("superseded by another attempt")
        return action

    try:
        control(force=True)  # a superseded attempt should not even load the model
        heartbeat.start("loading")
        if world.device.type == "cpu":
            torch.set_num_threads(cpu_threads(world.local_size))
        trainer = _prepare(spec, world, workdir, heartbeat, sender)
        return _train(spec, trainer, control, sender)
    except StaleAttempt:
        sender.close()
        if world.is_main:
            metrics.lease_expired("fine_tuning")
        log.info("training.stale_attempt", extra={"job_id": spec.job_id, "attempt": spec.attempt})
        return _outcome("stale", trainer)
    except TrainingError as error:
        _fail(sender, error.code, error.message, error.retryable)
        return _outcome("failed", trainer, error_code=error.code)
    except torch.cuda.OutOfMemoryError:
        message = "the GPU ran out of memory: lower batch_size or max_seq_len, or use LoRA"
        _fail(sender, "out_of_memory", message, False)
        return _outcome("failed", trainer, error_code="out_of_memory")
    except Exception as error:
        _fail(sender, "internal_error", f"{type(error).__name__}: {error}"[:2000], True)
        raise
    finally:
        heartbeat.stop()
        if metrics.ENABLED and world.is_main:  # no attempt runs here now: no throughput
            metrics.JOB_TOKENS_PER_SECOND.labels(kind="fine_tuning").set(0)
        shutil.rmtree(workdir, ignore_errors=True)


def _fail(sender: ReportSender, code: str, message: str, retryable: bool) -> None:
    sender.send(FAILED, {"code": code, "message": message, "retryable": retryable})


def _outcome(status: str, trainer: Trainer | None, **extra: Any) -> Outcome:
    if trainer is None:
        return Outcome(status, **extra)
    return Outcome(status, trainer.step, trainer.trained_tokens, metrics=trainer.metrics, **extra)


def _check(spec: TrainingSpec) -> None:
    hp = spec.hyperparameters
    problems = [
        f"{name} must be at least {least}"
        for name, value, least in (
            ("n_epochs", hp.n_epochs, 1),
            ("batch_size", hp.batch_size, 1),
            ("max_seq_len", hp.max_seq_len, 2),
        )
        if value < least
    ]
    if not (hp.learning_rate > 0 and math.isfinite(hp.learning_rate)):
        problems.append("learning_rate must be a positive number")
    if problems:
        raise TrainingError("invalid_hyperparameters", "; ".join(problems))
    formats.check_format(spec.training_data.format, task=spec.task, method=spec.method)
    for what, ref in (("validation", spec.validation_data), ("test", spec.test_data)):
        if ref is not None and ref.format != spec.training_data.format:
            raise TrainingError("invalid_spec", f"{what} data must have the training data's format")


def _dataset(
    spec: TrainingSpec, loaded: modeling.Loaded, uri: str, workdir: Path, what: str
) -> data.TokenizedSet:
    # Streamed to a local file first, then read line by line: never whole in memory.
    local = workdir / f"{what}.jsonl"
    try:
        storage.download_file(uri, local)
    except FileNotFoundError:
        raise TrainingError(
            f"invalid_{what}_file", f"the {what} file was not found: {uri}"
        ) from None
    try:
        return data.load(
            local,
            fmt=spec.training_data.format,
            tokenizer=loaded.tokenizer,
            labels=spec.labels,
            max_len=loaded.max_len,
            what=what,
        )
    finally:
        local.unlink(missing_ok=True)


def _prepare(
    spec: TrainingSpec, world: World, workdir: Path, heartbeat: Heartbeat, sender: ReportSender
) -> Trainer:
    _check(spec)
    base_dir = modeling.local_dir(spec.base_model.uri, what="base_model", cache=True)
    resume_dir = None
    if spec.resume_from:
        resume_dir = modeling.local_dir(spec.resume_from, what="checkpoint", cache=False)
    try:
        loaded = modeling.load(spec, base_dir=base_dir, resume_dir=resume_dir, device=world.device)
        train = _dataset(spec, loaded, spec.training_data.uri, workdir, "training")
        valid = None
        if spec.validation_data is not None:
            valid = _dataset(spec, loaded, spec.validation_data.uri, workdir, "validation")
        test = None
        if spec.test_data is not None:
            test = _dataset(spec, loaded, spec.test_data.uri, workdir, "test")
        elif spec.test_fraction > 0:
            train, test = split(train, spec.test_fraction, spec.hyperparameters.seed)
        trainer = Trainer(spec, loaded, train, valid, world, workdir, heartbeat, sender, test)
        if resume_dir is not None:
            trainer.resume(resume_dir)
        return trainer
    finally:
        if resume_dir is not None and storage.local_path(spec.resume_from or "") is None:
            shutil.rmtree(resume_dir, ignore_errors=True)


def split(train: data.TokenizedSet, fraction: float, seed: int) -> tuple[data.TokenizedSet, ...]:
    """(training rows, held-out test rows): the rows `held_out_rows` names go to the test
    set only, so every attempt (and the control plane's estimate) holds out the same ones."""
    held = held_out_rows(len(train), fraction, seed)
    if not held:
        raise TrainingError(
            "invalid_training_file",
            f"test_fraction {fraction} needs at least 2 training rows; the file has {len(train)}",
        )
    kept = [row for row in range(len(train)) if row not in held]
    return train.select(kept), train.select(sorted(held))


def _train(
    spec: TrainingSpec, trainer: Trainer, control: Callable[..., str], sender: ReportSender
) -> Outcome:
    trainer.started()
    while trainer.step < trainer.total_steps:
        action = control()
        if action == CANCEL:
            sender.send(CANCELLED, {"step": trainer.step})
            return _outcome("cancelled", trainer)
        if action == PAUSE:
            uri = trainer.checkpoint()
            sender.send(PAUSED, {"step": trainer.step, "checkpoint_uri": uri})
            return _outcome("paused", trainer, checkpoint_uri=uri)
        trainer.train_step()
    artifact = trainer.finish()
    return _outcome("succeeded", trainer, artifact_uri=artifact)
