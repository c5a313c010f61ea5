"""Small causal language models built locally: the platform's demo and test base models.

No hub is reachable from here (nor from many customers' clusters), so the
platform can make its own: a byte-level BPE tokenizer trained with `tokenizers`
on a built-in corpus, and a randomly initialised GPT-2- or Llama-style model
saved as a normal Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template). Everything that
loads it afterwards uses the ordinary `from_pretrained(path)`.

    python -m gpuworkers.models.tiny --family llama --out .data/models/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FAMILIES = ("gpt2", "llama")

#: ChatML-style template, shared by both families (rendered by transformers' Jinja).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

_TEXT = (
    "the model learns from data and the customer owns the result a dataset of chat "
    "messages trains an assistant to answer questions about orders invoices refunds "
    "shipping returns accounts passwords billing plans usage tokens latency errors "
    "please thank you hello how can i help today your order has shipped it will arrive "
    "on monday the invoice is attached we are sorry for the delay our team will call "
    "you back the weather is sunny the cat sat on the mat one two three four five six "
    "seven eight nine ten positive negative neutral good bad great terrible fine"
)
_WORDS = tuple(_TEXT.split(" "))


def corpus(lines: int = 4000, seed: int = 0) -> Iterator[str]:
    """Deterministic pseudo-sentences over a small vocabulary (no randomness source needed)."""
    state = seed * 2654435761 + 1
    for _ in range(lines):
        words = []
        for _ in range(8 + state % 9):
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            words.append(_WORDS[(state >> 33) % len(_WORDS)])
        yield " ".join(words)


def train_tokenizer(vocab_size: int = 512) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def _config(family: str, vocab_size: int, *, hidden: int, layers: int, context: int) -> Any:
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=context,
            n_embd=hidden,
            n_layer=layers,
            n_head=max(1, hidden // 32),
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=3,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=context,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=3,
        tie_word_embeddings=True,
    )


def build(
    family: str,
    out: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    context: int = 256,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a ready-to-load model directory at `out` and return it."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=context,
    )
    fast.chat_template = CHAT_TEMPLATE
    config = _config(family, len(fast), hidden=hidden, layers=layers, context=context)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    (out / "atelier.json").write_text(
        json.dumps({"family": family, "context_length": context, "built_by": __name__})
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args(argv)
    path = build(
        args.family, args.out, hidden=args.hidden, layers=args.layers, context=args.context
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
