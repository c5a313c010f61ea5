"""Incremental detokenization and stop strings, one generated sequence at a time.

A token can end in the middle of a UTF-8 character (byte-level BPE) and a
sentencepiece token's leading space depends on the token before it, so each new
token is decoded together with the one before it, and text is only released once
it no longer ends in U+FFFD. With stop strings, the last `len(longest stop) - 1`
characters are held back until it is clear they do not start a stop string, so
a streamed delta never contains stop text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Decode = Callable[[list[int]], str]
REPLACEMENT = "\ufffd"


def decoder(tokenizer: Any) -> Decode:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, through the Rust tokenizer
    directly when that gives the same text (no clean-up pass configured).

    One token's text is remembered (at most the vocabulary): a streamed sequence
    decodes the token it has just emitted once per new token (`Detokenizer.add`).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "decode")
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):

        def run(ids: list[int]) -> str:
            return str(backend.decode(ids, skip_special_tokens=True))

    else:

        def run(ids: list[int]) -> str:
            return str(tokenizer.decode(ids, skip_special_tokens=True))

    single: dict[int, str] = {}

    def decode(ids: list[int]) -> str:
        if len(ids) != 1:
            return run(ids)
        found = single.get(ids[0])
        if found is None:
            found = single[ids[0]] = run(ids)
        return found

    return decode


class Detokenizer:
    __slots__ = ("decode", "ids", "prefix", "read")

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already turned into text
        self.read = 0

    def add(self, token: int) -> str:
        """The text `token` completes (often "", while a character is incomplete)."""
        ids = self.ids
        ids.append(token)
        before = self.decode(ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = self.decode(ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix = self.read
            self.read = len(ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left at the end, incomplete characters included."""
        if self.read >= len(self.ids):
            return ""
        before = self.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class TextState:
    """The text of one sequence: what has been sent, and whether a stop string ended it."""

    __slots__ = ("detok", "holdback", "sent", "stopped", "stops", "text")

    def __init__(self, decode: Decode, stops: tuple[str, ...]) -> None:
        self.detok = Detokenizer(decode)
        self.stops = tuple(s for s in stops if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text that may be streamed now. Sets `stopped`."""
        new = self.detok.add(token)
        if not new:
            return ""
        return self._extend(new, final=False)

    def finish(self) -> str:
        """The sequence ended (length, end token, cancel): release everything left."""
        if self.stopped:
            return ""
        return self._extend(self.detok.flush(), final=True)

    def _extend(self, new: str, *, final: bool) -> str:
        start = len(self.text)
        self.text += new
        if self.stops:
            cut = -1
            begin = max(0, start - self.holdback)
            for stop in self.stops:
                found = self.text.find(stop, begin)
                if found != -1 and (cut == -1 or found < cut):
                    cut = found
            if cut != -1:
                self.text = self.text[:cut]
                self.stopped = True
        end = len(self.text) if (final or self.stopped) else len(self.text) - self.holdback
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
