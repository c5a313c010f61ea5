"""Continuous batching for one loaded causal LM: prefill, decode steps, rows joining and leaving.

The batch keeps one KV cache (transformers' `DynamicCache`) for all its rows,
left-padded to a common length, with a 2-D attention mask and explicit position
ids per row, so a row's tokens are computed as if it were alone. New requests
are prefilled together (left-padded, logits for the last position only), and
their cache is padded and concatenated onto the running one at a step
boundary; rows that finish are dropped from the cache at once, and padding
columns no row needs any more are cut off.
"""

from __future__ import annotations

from typing import Any

import torch

from gpuworkers import metrics
from gpuworkers.inference.jobs import Job
from gpuworkers.inference.models import Loaded
from gpuworkers.inference.sampling import Logprobs, Plan, Random, choose, plan, row_seed
from gpuworkers.inference.text import Decode, TextState, decoder
from gpuworkers.outbox_process import ProcessOutbox
from gpuworkers.replies import Message, Outbox
from jobcontracts.inference import CANCELLED, DELTA, LENGTH, STOP


class Row:
    """One generated sequence (a choice of a request)."""

    __slots__ = (
        "adapter",
        "finish",
        "index",
        "job",
        "logprobs",
        "max_new",
        "pending_logprobs",
        "random",
        "stop_ids",
        "stream",
        "temperature",
        "text",
        "tokens",
        "top_logprobs",
        "top_p",
        "want_logprobs",
    )

    def __init__(
        self, job: Job, index: int, prompt_len: int, loaded: Loaded, decode: Decode
    ) -> None:
        params = job.request.params
        self.job = job
        self.index = index
        self.adapter = job.adapter
        self.temperature = float(params.temperature)
        self.top_p = float(params.top_p)
        self.want_logprobs = bool(params.logprobs)
        self.top_logprobs = max(0, int(params.top_logprobs)) if params.logprobs else 0
        self.random = Random(row_seed(params.seed, index))
        context = min(loaded.context_length, job.request.model.context_length or 1 << 30)
        self.max_new = max(1, min(int(params.max_tokens), context - prompt_len))
        self.stop_ids = loaded.turn_ids if job.request.kind == "chat" else loaded.eos_ids
        self.stream = job.request.stream
        needs_text = self.stream or bool(params.stop)
        self.text = TextState(decode, params.stop) if needs_text else None
        self.tokens: list[int] = []
        self.logprobs: list[dict[str, Any]] | None = [] if self.want_logprobs else None
        self.pending_logprobs: list[dict[str, Any]] = []
        self.finish: str | None = None


class DecodeBatch:
    def __init__(self, loaded: Loaded, outbox: Outbox | ProcessOutbox) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.outbox = outbox
        self.decode = decoder(loaded.tokenizer)
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self._plan: Plan | None = None
        self._names: list[str] | None = None
        #: Whether a prefilled cache can join the running one (full-attention layers).
        self.joinable = True
        self._token_text: dict[int, str] = {}
        #: What this batch's cache adds to the KV-cache gauge, and the bytes one row's
        #: column takes in it (every layer's keys and values), read from the first cache.
        self._kv_bytes = 0
        self._column_bytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    # -- forwards ------------------------------------------------------------------

    def _forward(self, names: list[str] | None, **inputs: Any) -> torch.Tensor:
        router = self.loaded.router
        if router is not None:
            router.names = names
        out = self.model(**inputs, use_cache=True)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def prefill(self, items: list[tuple[Job, int]]) -> list[Row]:
        """Prefill prompt `i` of each job together; the new rows join the batch.
        Returns the rows that finished at their first token."""
        from transformers import DynamicCache

        prompts = [job.prepared.prompts[i] for job, i in items]
        width = max(len(p) for p in prompts)
        pad = self.loaded.pad_id
        ids = [[pad] * (width - len(p)) + p for p in prompts]
        mask_rows = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        input_ids = torch.tensor(ids, device=self.device)
        mask = torch.tensor(mask_rows, device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(
            [job.adapter for job, _ in items],
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        )
        rows: list[Row] = []
        source: list[int] = []
        for j, (job, prompt) in enumerate(items):
            for choice in range(job.n):
                rows.append(
                    Row(job, prompt * job.n + choice, len(prompts[j]), self.loaded, self.decode)
                )
                source.append(j)
        lengths = mask.sum(-1)
        if len(source) != len(items):  # n > 1: every choice starts from the same prompt
            index = torch.tensor(source, device=self.device)
            cache.batch_select_indices(index)
            logits, mask, lengths = logits[index], mask[index], lengths[index]
        tokens, logprobs = choose(logits, plan(rows, self.device))
        finished = self._advance(rows, tokens, logprobs)
        self.joinable = all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
        keep = [i for i in range(len(rows)) if i not in set(finished)]
        if keep:
            index = torch.tensor(keep, device=self.device)
            if len(keep) != len(rows):
                cache.batch_select_indices(index)
            self._join([rows[i] for i in keep], cache, mask[index], lengths[index], tokens[index])
        return [rows[i] for i in finished]

    def step(self) -> list[Row]:
        """One decode step for every row; returns the rows that finished."""
        finished: list[Row] = []
        cancelled = self.outbox.cancelled
        if cancelled:
            gone = [i for i, r in enumerate(self.rows) if r.job.request_id in cancelled]
            if gone:
                for i in gone:
                    row = self.rows[i]
                    # Stream what the row still held back (a partial character, text
                    # kept for stop strings), so the deltas always add up to the text.
                    rest = self._end(row, CANCELLED)
                    if row.stream and (rest or row.pending_logprobs):
                        data: dict[str, Any] = {"index": row.index, "text": rest}
                        if row.pending_logprobs:
                            data["logprobs"] = row.pending_logprobs
                            row.pending_logprobs = []
                        self.outbox.send(row.job.request_id, DELTA, data)
                finished += [self.rows[i] for i in gone]
                self._remove(gone)
        if not self.rows:
            return finished
        if self._plan is None:
            self._plan = plan(self.rows, self.device)
            self._names = [r.adapter for r in self.rows]
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits = self._forward(
            self._names,
            input_ids=self.next_tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
        )
        self.positions += 1
        tokens, logprobs = choose(logits, self._plan)
        self.next_tokens = tokens
        done = self._advance(self.rows, tokens, logprobs)
        if done:
            finished += [self.rows[i] for i in done]
            self._remove(done)
        return finished

    def fail_all(self) -> list[Row]:
        rows, self.rows = self.rows, []
        self._reset()
        return rows

    # -- per-token bookkeeping ----------------------------------------------------------

    def _advance(self, rows: list[Row], tokens: torch.Tensor, lp: Logprobs | None) -> list[int]:
        ids: list[int] = tokens.tolist()
        finished: list[int] = []
        deltas: list[Message] = []
        entries: dict[int, dict[str, Any]] = {}
        if lp is not None:
            for k, row_index in enumerate(lp.rows):
                # The plan asks for the batch's largest top_logprobs; each row keeps
                # the number it asked for.
                entries[row_index] = self._logprob_entry(
                    ids[row_index], lp, k, rows[row_index].top_logprobs
                )
        for i, token in enumerate(ids):
            row = rows[i]
            row.tokens.append(token)
            entry = entries.get(i)
            if entry is not None and row.logprobs is not None:
                row.logprobs.append(entry)
                if row.stream:
                    row.pending_logprobs.append(entry)
            text = ""
            finish = None
            if token in row.stop_ids:
                finish = STOP
            elif row.text is not None:
                text = row.text.push(token)
                if row.text.stopped:
                    finish = STOP
            if finish is None and len(row.tokens) >= row.max_new:
                finish = LENGTH
            if finish is not None:
                text += self._end(row, finish)
                finished.append(i)
            if row.stream and (text or (finish is not None and row.pending_logprobs)):
                data: dict[str, Any] = {"index": row.index, "text": text}
                if row.pending_logprobs:
                    data["logprobs"] = row.pending_logprobs
                    row.pending_logprobs = []
                deltas.append((row.job.request_id, DELTA, data))
        if deltas:
            self.outbox.send_many(deltas)
        return finished

    def _end(self, row: Row, finish: str) -> str:
        """Finish a row; returns the text it still had to stream."""
        row.finish = finish
        rest = row.text.finish() if row.text is not None else ""
        return rest

    def final_text(self, row: Row) -> str:
        if row.text is not None:
            return row.text.text
        tokens = row.tokens
        if row.finish == STOP and tokens and tokens[-1] in row.stop_ids:
            tokens = tokens[:-1]
        return self.decode(tokens)

    def _logprob_entry(self, token: int, lp: Logprobs, k: int, top: int) -> dict[str, Any]:
        return {
            "token": self._text_of(token),
            "logprob": lp.chosen[k],
            "top_logprobs": [
                {"token": self._text_of(t), "logprob": v}
                for t, v in zip(lp.top_ids[k][:top], lp.top_values[k][:top], strict=True)
            ],
        }

    def _text_of(self, token: int) -> str:
        found = self._token_text.get(token)
        if found is None:
            found = self._token_text[token] = str(self.loaded.tokenizer.decode([token]))
        return found

    # -- the cache ------------------------------------------------------------------

    def _join(
        self,
        rows: list[Row],
        cache: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        self._plan = None
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            self.positions, self.next_tokens = positions, tokens
            self._account()
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.positions = torch.cat([self.positions, positions])
        self.next_tokens = torch.cat([self.next_tokens, tokens])
        self.rows = self.rows + rows
        self._account()

    def _remove(self, indices: list[int]) -> None:
        self._plan = None
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if not keep:
            self.rows = []
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.next_tokens = self.next_tokens[index]
        self.rows = [self.rows[i] for i in keep]
        # Left padding that no remaining row uses costs attention on every step: cut it
        # (full-attention caches only: a sliding-window layer keeps its own window).
        first = int(self.mask.any(dim=0).int().argmax()) if self.joinable else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
        self._account()

    def _reset(self) -> None:
        self.cache = None
        self._plan = None
        self.mask = self.mask[:0, :0]
        self.positions = self.positions[:0]
        self.next_tokens = self.next_tokens[:0]
        self._account()

    def _account(self) -> None:
        """Move the KV-cache gauge to what this batch's cache holds now: rows x columns
        x a column's bytes. Called when rows join or leave (never per step: the columns
        a step adds show at the next change)."""
        if not metrics.ENABLED:
            return
        if not self._column_bytes and self.cache is not None:
            self._column_bytes = sum(
                (layer.keys[0, ..., :1, :].numel() + layer.values[0, ..., :1, :].numel())
                * layer.keys.element_size()
                for layer in self.cache.layers
                if getattr(layer, "keys", None) is not None and layer.keys.numel()
            )
        held = len(self.rows) * int(self.mask.shape[1]) * self._column_bytes if self.rows else 0
        if held != self._kv_bytes:
            metrics.KV_CACHE_BYTES.inc(held - self._kv_bytes)
            self._kv_bytes = held


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (dim 2 of a (B, H, T, D) cache, dim 1 of a mask) to `width`."""
    seq_dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[seq_dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[seq_dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=seq_dim)
