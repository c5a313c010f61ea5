"""The training loop's state and steps: optimizer, batches, evaluation, checkpoints.

Step `n` (1-based) trains on the rows `BatchOrder.rows(n)` (grouped by length unless
`group_by_length` is off), split across ranks; before it, the global RNG is seeded from
(seed, n), so dropout and the data a step sees are the same whether the run was resumed
or not. With `packing` (causal LM), a step's rows are packed into few sequences
(`TokenizedSet.collate_packed`): the same loss and gradients, less padding.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from gpuworkers import metrics, storage
from gpuworkers.training import checkpoint, modeling, objectives
from gpuworkers.training.control import Heartbeat, ReportSender
from gpuworkers.training.data import BatchOrder, TokenizedSet
from gpuworkers.training.distributed import World
from gpuworkers.training.errors import TrainingError
from jobcontracts.training import CHECKPOINT, METRICS, PROGRESS, STARTED, SUCCEEDED, TrainingSpec

MAX_GRAD_NORM = 1.0
PROGRESS_EVERY_SECONDS = 1.0
#: The job kind this loop's metrics are counted under.
JOB_KIND = "fine_tuning"


class Trainer:
    def __init__(
        self,
        spec: TrainingSpec,
        loaded: modeling.Loaded,
        train: TokenizedSet,
        valid: TokenizedSet | None,
        world: World,
        workdir: Path,
        heartbeat: Heartbeat,
        sender: ReportSender,
        test: TokenizedSet | None = None,
    ) -> None:
        self.spec, self.loaded, self.train, self.valid = spec, loaded, train, valid
        #: Held-out rows, evaluated once by `finish`: never in `train`.
        self.test = test
        self.test_metrics: dict[str, float] | None = None
        self.world, self.workdir, self.heartbeat, self.sender = world, workdir, heartbeat, sender
        hp = spec.hyperparameters
        lengths = train.row_lengths() if hp.group_by_length else None
        self.order = BatchOrder(len(train), hp.batch_size, hp.seed, lengths)
        self.packing = hp.packing and train.kind == "lm"
        # Flash attention takes packed rows flat, as one sequence (its varlen path).
        # Eager and SDPA attend over the whole packed length under a block-diagonal
        # mask, so their sequences are only as long as the batch's longest row: on CPU
        # (bench rows, one thread) that packed 3% faster than sequences of max_len.
        attention = str(getattr(loaded.model.config, "_attn_implementation", "") or "")
        self.pack_capacity = None if attention.startswith("flash") else 0
        self.total_steps = self.order.per_epoch * hp.n_epochs
        self.step = 0
        self.resumed_from = 0
        self.trained_tokens = 0
        self.metrics: dict[str, float] = {}
        self.pad_id = int(loaded.tokenizer.pad_token_id)
        trainable = [p for p in loaded.model.parameters() if p.requires_grad]
        self.params = trainable
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=hp.learning_rate,
            weight_decay=hp.weight_decay,
            # One kernel for all parameters (CPU and CUDA): ~10x the per-tensor loop on CPU.
            fused=world.device.type in ("cpu", "cuda"),
        )
        warmup = int(hp.warmup_ratio * self.total_steps)
        total = self.total_steps

        def schedule(done: int) -> float:  # linear warmup, then linear decay
            if done < warmup:
                return (done + 1) / (warmup + 1)
            return max(0.0, (total - done) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.model = world.wrap(loaded.model)
        self.bf16 = world.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self._last_checkpoint: tuple[int, str] | None = None
        self._checkpoint_clock = time.monotonic()
        self._progress_clock = 0.0
        self._clock = 0.0
        self._tokens_at_start = 0

    # --- state -------------------------------------------------------------------------

    def resume(self, directory: Path) -> None:
        state = checkpoint.read_state(directory)
        if state.get("total_steps") not in (None, self.total_steps):
            raise TrainingError(
                "checkpoint_mismatch",
                f"the checkpoint was made for {state['total_steps']} steps, this job has "
                f"{self.total_steps}: resume with the same data and hyperparameters",
            )
        checkpoint.load_optimizer(
            directory / checkpoint.OPTIMIZER_FILE, self.optimizer, self.scheduler
        )
        self.step = self.resumed_from = int(state["step"])
        rng = state.get("rng")
        if isinstance(rng, str) and ("grouped by length" in rng) != self.order.grouped:
            # Made with the other batch order (before length grouping was the default):
            # keep it, so the resumed job still sees the batches it would have.
            hp = self.spec.hyperparameters
            lengths = None if self.order.grouped else self.train.row_lengths()
            self.order = BatchOrder(len(self.train), hp.batch_size, hp.seed, lengths)
        if self.spec.resume_from:  # pausing again before a step: that checkpoint still holds
            self._last_checkpoint = (self.step, self.spec.resume_from)
        self.trained_tokens = int(state.get("trained_tokens", 0))
        self.metrics = {k: float(v) for k, v in dict(state.get("metrics") or {}).items()}

    def _state(self) -> dict[str, Any]:
        hp = self.spec.hyperparameters
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.order.epoch(max(self.step, 1)) + 1,
            "trained_tokens": self.trained_tokens,
            "metrics": self.metrics,
            "seed": hp.seed,
            "rng": "data order: randperm(seed*1000003+epoch)"
            + (", grouped by length" if self.order.grouped else "")
            + "; step n: manual_seed(seed*1000003+n)",
            "world_size": self.world.size,
            "job_id": self.spec.job_id,
            "attempt": self.spec.attempt,
            "base_model": self.spec.base_model.name,
            "artifact_kind": self.loaded.kind,
        }

    # --- steps ---------------------------------------------------------------------------

    def started(self) -> None:
        self.heartbeat.phase = "training"
        self.sender.send(
            STARTED,
            {
                "total_steps": self.total_steps,
                "resumed_from_step": self.resumed_from,
                "device": str(self.world.device.type),
                "world_size": self.world.size,
            },
        )
        self._clock = time.monotonic()
        self._tokens_at_start = self.trained_tokens

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _my_batch(self, rows: list[int]) -> tuple[dict[str, torch.Tensor], float]:
        mine = rows[self.world.rank :: self.world.size]
        # A rank with no rows (the last, short batch) still runs a step so DDP's
        # gradient sync lines up; its contribution is multiplied by zero.
        weight = 1.0 if mine else 0.0
        batch = self._collate(self.train, mine or rows[:1])
        return {k: v.to(self.world.device) for k, v in batch.items()}, weight

    def _collate(self, dataset: TokenizedSet, rows: list[int]) -> dict[str, torch.Tensor]:
        if self.packing and dataset.kind == "lm":
            return dataset.collate_packed(rows, self.pad_id, self.pack_capacity)
        return dataset.collate(rows, self.pad_id)

    def train_step(self) -> None:
        step = self.step + 1
        hp = self.spec.hyperparameters
        torch.manual_seed(hp.seed * 1_000_003 + step)
        lr = float(self.scheduler.get_last_lr()[0])
        batch, weight = self._my_batch(self.order.rows(step))
        with self._autocast():
            sums = objectives.compute(
                self.train.kind, self.model, batch, reference=self.loaded.reference, beta=hp.beta
            )
        loss_sum, count, tokens = self.world.sum(
            [float(sums.loss.detach()) * weight, sums.count * weight, sums.tokens * weight]
        )
        # Mean over the whole (global) batch; DDP averages gradients over ranks.
        torch.autograd.backward(sums.loss * weight * self.world.size / max(count, 1.0))
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        train_loss = loss_sum / max(count, 1.0)
        if not math.isfinite(train_loss):
            raise TrainingError(
                "training_diverged",
                f"the loss became {train_loss} at step {step}: lower learning_rate",
            )
        self.step = step
        self.trained_tokens += int(tokens)
        if metrics.ENABLED and self.world.is_main:  # `tokens` is every rank's: counted once
            metrics.JOB_TOKENS.labels(kind=JOB_KIND).inc(int(tokens))
        self.metrics["train_loss"] = train_loss
        self._progress(step, train_loss, lr)
        self._after_step(step)

    def _progress(self, step: int, train_loss: float, lr: float) -> None:
        now = time.monotonic()
        first, last = step == self.resumed_from + 1, step == self.total_steps
        if not (first or last or now - self._progress_clock >= PROGRESS_EVERY_SECONDS):
            return
        self._progress_clock = now
        elapsed = max(now - self._clock, 1e-9)
        done = step - self.resumed_from
        tokens_now = self.trained_tokens - self._tokens_at_start
        if metrics.ENABLED and self.world.is_main:
            metrics.JOB_TOKENS_PER_SECOND.labels(kind=JOB_KIND).set(tokens_now / elapsed)
        self.sender.send(
            PROGRESS,
            {
                "step": step,
                "total_steps": self.total_steps,
                "epoch": self.order.epoch(step) + 1,
                "train_loss": train_loss,
                "learning_rate": lr,
                "tokens_per_second": tokens_now / elapsed,
                "eta_seconds": (self.total_steps - step) * elapsed / done,
                "trained_tokens": self.trained_tokens,
            },
        )

    def _after_step(self, step: int) -> None:
        spec = self.spec
        if self.valid is not None:
            every = spec.eval_every_steps
            due = step % every == 0 if every > 0 else step % self.order.per_epoch == 0
            if due or step == self.total_steps:
                self.evaluate(step)
        if step < self.total_steps:
            by_steps = spec.checkpoint_every_steps > 0 and step % spec.checkpoint_every_steps == 0
            elapsed = time.monotonic() - self._checkpoint_clock
            by_time = 0 < spec.checkpoint_every_seconds <= elapsed and self.world.is_main
            if by_steps or by_time:
                self.checkpoint()

    def evaluate(self, step: int) -> None:
        assert self.valid is not None
        found = self._scores(self.valid, "valid")
        self.metrics.update(found)
        self.sender.send(METRICS, {"step": step, **found})

    def evaluate_test(self) -> dict[str, float]:
        """Score the final model on the held-out test rows (every rank takes part)."""
        assert self.test is not None
        found = self._scores(self.test, "test")
        self.test_metrics = {**found, "test_rows": float(len(self.test))}
        self.sender.send(METRICS, {"step": self.step, **self.test_metrics})
        return self.test_metrics

    def _scores(self, dataset: TokenizedSet, prefix: str) -> dict[str, float]:
        """Metrics of the current model on `dataset`, its rows split across ranks."""
        self.heartbeat.phase = "evaluating"
        model = modeling.unwrap(self.model)
        model.eval()
        classes = len(self.spec.labels) if dataset.kind == "classification" else 0
        totals = [0.0, 0.0, 0.0] + [0.0] * (3 * classes)
        # Longest first: batches of similar length pad little (the sums ignore the order).
        lengths = dataset.row_lengths()
        rows = sorted(
            range(self.world.rank, len(dataset), self.world.size), key=lambda r: -lengths[r]
        )
        size = self.spec.hyperparameters.batch_size
        with torch.no_grad():
            for start in range(0, len(rows), size):
                batch = self._collate(dataset, rows[start : start + size])
                batch = {k: v.to(self.world.device) for k, v in batch.items()}
                with self._autocast():
                    sums = objectives.compute(
                        dataset.kind,
                        model,
                        batch,
                        reference=self.loaded.reference,
                        beta=self.spec.hyperparameters.beta,
                    )
                totals[0] += float(sums.loss)
                totals[1] += sums.count
                totals[2] += sums.correct
                if classes and sums.predicted is not None:
                    counts = objectives.confusion_counts(
                        sums.predicted.cpu(), batch["labels"].cpu(), classes
                    )
                    for i, value in enumerate(counts):
                        totals[3 + i] += value
        model.train()
        summed = self.world.sum(totals)
        self.heartbeat.phase = "training"
        return objectives.metrics(
            dataset.kind,
            loss=summed[0],
            count=summed[1],
            correct=summed[2],
            prefix=prefix,
            confusion=summed[3:],
        )

    def checkpoint(self) -> str:
        """Write (rank 0) and report a checkpoint of the current step; returns its URI."""
        if self._last_checkpoint is not None and self._last_checkpoint[0] == self.step:
            return self._last_checkpoint[1]
        uri = storage.join(self.spec.output_uri, "checkpoints", checkpoint.name(self.step))
        if self.world.is_main:
            self.heartbeat.phase = "checkpointing"
            local = self.workdir / checkpoint.name(self.step)
            modeling.save_weights(
                self.model, self.loaded.tokenizer, local, base_name=self.spec.base_model.name
            )
            checkpoint.save_optimizer(
                local / checkpoint.OPTIMIZER_FILE, self.optimizer, self.scheduler
            )
            checkpoint.write_state(local, self._state())
            storage.upload_dir(local, uri, last=(checkpoint.STATE_FILE,))
            shutil.rmtree(local, ignore_errors=True)
            self.heartbeat.phase = "training"
            self.sender.send(CHECKPOINT, {"step": self.step, "uri": uri, "metrics": self.metrics})
        self._last_checkpoint = (self.step, uri)
        self._checkpoint_clock = time.monotonic()
        return uri

    def finish(self) -> str:
        """Write the final artifact (rank 0), report `succeeded`; returns its URI."""
        uri = storage.join(self.spec.output_uri, "final")
        if self.test is not None and self.test_metrics is None:
            self.evaluate_test()
        if not self.world.is_main:
            return uri
        self.heartbeat.phase = "uploading"
        local = self.workdir / "final"
        model = modeling.unwrap(self.model)
        modeling.save_weights(
            model, self.loaded.tokenizer, local, base_name=self.spec.base_model.name
        )
        modeling.write_manifest(
            local, spec=self.spec, kind=self.loaded.kind, family=self.loaded.family
        )
        names = storage.upload_dir(local, uri, last=("atelier.json",))
        self.sender.send(
            SUCCEEDED,
            {
                "step": self.step,
                "trained_tokens": self.trained_tokens,
                "artifact_uri": uri,
                "artifact_files": names,
                "artifact_kind": self.loaded.kind,
                "metrics": self.metrics,
                "test_metrics": self.test_metrics,
            },
        )
        return uri
