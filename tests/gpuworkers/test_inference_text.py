"""Incremental detokenization, stop strings and sampling, piece by piece."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer

from gpuworkers.inference.sampling import Random, choose, plan, row_seed
from gpuworkers.inference.text import Detokenizer, TextState, decoder
from tests.support.models import tiny_model_dir

MULTIBYTE = "héllo 🙂 wörld, naïve café ✓"


def _tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def test_tokens_that_split_a_character_release_it_only_once_complete() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer(MULTIBYTE)["input_ids"]
    # Byte-level BPE: some tokens are half a character on their own.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = Detokenizer(decoder(tokenizer))
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + detok.flush() == MULTIBYTE


def test_an_unfinished_character_at_the_end_is_flushed_as_is() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer("🙂")["input_ids"]
    assert len(ids) > 1
    detok = Detokenizer(decoder(tokenizer))
    pieces = [detok.add(i) for i in ids[:-1]]
    assert "".join(pieces) == ""
    assert detok.flush() == tokenizer.decode(ids[:-1])


def test_stop_text_is_held_back_then_cut_and_never_streamed() -> None:
    tokenizer = _tokenizer()
    text = "the cat sat on the mat the weather is sunny"
    ids = tokenizer(text)["input_ids"]
    state = TextState(decoder(tokenizer), ("on the mat", "zzz"))
    streamed = ""
    for token in ids:
        streamed += state.push(token)
        assert "on the" not in streamed
        if state.stopped:
            break
    assert state.stopped
    assert state.text == "the cat sat "
    assert streamed == "the cat sat "
    assert state.finish() == ""


def test_without_a_stop_everything_streams_and_nothing_is_lost() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer(MULTIBYTE)["input_ids"]
    state = TextState(decoder(tokenizer), ("never",))
    streamed = "".join(state.push(i) for i in ids) + state.finish()
    assert streamed == state.text == MULTIBYTE
    assert not state.stopped


class _Row:
    def __init__(self, temperature: float, top_p: float = 1.0, seed: int | None = None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.want_logprobs = False
        self.top_logprobs = 0
        self.random = Random(seed)


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))

    def draw() -> list[int]:
        rows = [_Row(0.0), _Row(1.0, seed=5), _Row(0.7, top_p=0.5, seed=6), _Row(0.0)]
        p = plan(rows, torch.device("cpu"))
        return [int(t) for t in [choose(logits, p)[0] for _ in range(5)][-1]]

    first, second = draw(), draw()
    assert first == second
    assert first[0] == int(logits[0].argmax())
    assert first[3] == int(logits[3].argmax())


def test_sampling_follows_the_distribution_and_top_p_cuts_its_tail() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    counts = torch.zeros(4)
    nucleus = torch.zeros(4)
    rows, cut = [_Row(1.0, seed=1)], [_Row(1.0, top_p=0.7, seed=2)]
    p, q = plan(rows, torch.device("cpu")), plan(cut, torch.device("cpu"))
    for _ in range(4000):
        counts[int(choose(logits, p)[0][0])] += 1
        nucleus[int(choose(logits, q)[0][0])] += 1
    assert torch.allclose(counts / 4000, probs[0], atol=0.03)
    # top_p 0.7: the tokens with 0.5 and 0.3 (reaching 0.7), renormalised: 0.625 / 0.375.
    assert nucleus[2] == nucleus[3] == 0
    assert abs(float(nucleus[0] / 4000) - 0.625) < 0.03


def test_each_choice_of_a_seeded_request_has_its_own_stream() -> None:
    assert row_seed(None, 0) is None
    assert row_seed(7, 0) == row_seed(7, 0)
    assert len({row_seed(7, i) for i in range(4)} | {row_seed(8, 0)}) == 5
