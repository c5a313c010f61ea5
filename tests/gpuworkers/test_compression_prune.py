"""Structured pruning really removes heads, channels and layers, and the result is a plain
Hugging Face model: smaller config, smaller safetensors, loads and runs with
`from_pretrained`, and computes exactly what the source computes without what was cut."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from gpuworkers.compression.channels import obs_select
from gpuworkers.compression.context import Cancelled, CompressionError, Work
from gpuworkers.compression.prune import prune
from gpuworkers.models import tiny
from tests.support.models import minilm_dir

CPU = torch.device("cpu")
TEXTS = list(tiny.corpus(48))
HELD_OUT = list(tiny.corpus(16, seed=7))
SENTENCES = [
    f"{who} {did} the {what} {when}"
    for who in ("My sister", "The driver", "A customer", "Our team")
    for did in ("found", "returned", "painted", "ordered")
    for what, when in (("red bicycle", "on Monday"), ("old invoice", "last night"))
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two shared cores: a second OpenMP thread only waits for the first.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit(folder: Path, steps: int = 120) -> Path:
    """Train a random model on the corpus a little, so it has something to lose when pruned
    (a random teacher's logits say nothing the data agrees with)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        start = (step * 8) % len(TEXTS)
        inputs = tokenizer(TEXTS[start : start + 8], padding=True, return_tensors="pt")
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(folder), safe_serialization=True)
    torch.set_num_threads(threads)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4-layer models wide enough to lose heads: Llama 4 heads in 2 KV groups, GPT-2 4 heads;
    the Llama one trained a little."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "llama": fit(tiny.build("llama", root / "llama", hidden=128, layers=4)),
        "gpt2": tiny.build("gpt2", root / "gpt2", hidden=128, layers=4),
    }


def run_prune(
    source: Path, out: Path, task: str = "causal_lm", **options: Any
) -> tuple[Work, list[float]]:
    losses: list[float] = []
    work = Work(
        task=task,
        method="prune",
        source_dir=source,
        out_dir=out,
        options=options,
        device=CPU,
        train_texts=list(options.pop("texts", TEXTS)),
        train_labels=list(options.pop("train_labels", [])),
        labels=tuple(options.pop("labels", ())),
        step=lambda step, total, loss: losses.append(float(loss or 0.0)),
    )
    prune(work)
    return work, losses


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def lm(folder: Path) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    return model.eval()


def ids(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def kept_rows(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """Which rows of `big` the rows of `small` are (each must be exactly one)."""
    matches = (small[:, None, :] == big[None, :, :]).all(dim=-1).nonzero()
    assert matches.shape[0] == small.shape[0]
    return [int(i) for i in matches[:, 1]]


def test_llama_heads_and_channels_are_removed_and_the_rest_computes_as_before(
    models: dict[str, Path], tmp_path: Path
) -> None:
    work, _ = run_prune(models["llama"], tmp_path / "out", sparsity=0.5)

    source, pruned = lm(models["llama"]), lm(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # Half the heads, removed as a whole KV group so GQA stays consistent, at the same head size.
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    assert config["head_dim"] == 32
    assert config["intermediate_size"] == 128  # from 256
    assert work.notes["heads_per_layer"] == {"before": 4, "after": 2}
    assert work.notes["intermediate_size"] == {"before": 256, "after": 128}
    assert work.notes["prunable_parameters"]["removed_fraction"] == pytest.approx(0.5, abs=0.02)
    assert count(pruned) < count(source) * 0.6
    assert weights_bytes(tmp_path / "out") < weights_bytes(models["llama"]) * 0.6
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab() == (
        AutoTokenizer.from_pretrained(str(models["llama"])).get_vocab()
    )

    # The source without the removed heads and channels, its down projections replaced by
    # the pruned model's refit ones, is the pruned model; the refit is closer to the source
    # than the plain cut (the same channels zeroed, the weights left as they were).
    inputs = ids(tmp_path / "out", HELD_OUT)
    cut = lm(models["llama"])
    with torch.no_grad():
        refits = []
        for index, (big, small) in enumerate(
            zip(source.model.layers, pruned.model.layers, strict=True)
        ):
            heads = work.notes["heads_kept"][index]
            assert len(heads) == 2
            assert heads[0] // 2 == heads[1] // 2
            dropped = [h for h in range(4) if h not in heads]
            for h in dropped:
                big.self_attn.o_proj.weight[:, h * 32 : (h + 1) * 32] = 0
            channels = kept_rows(small.mlp.up_proj.weight, big.mlp.up_proj.weight)
            assert channels == sorted(channels)
            assert kept_rows(small.mlp.gate_proj.weight, big.mlp.gate_proj.weight) == channels
            removed = [c for c in range(256) if c not in channels]
            refit = torch.zeros_like(big.mlp.down_proj.weight)
            refit[:, channels] = small.mlp.down_proj.weight
            refits.append(refit)
            cut.model.layers[index].load_state_dict(big.state_dict())
            cut.model.layers[index].mlp.down_proj.weight[:, removed] = 0
        for big, refit in zip(source.model.layers, refits, strict=True):
            big.mlp.down_proj.weight.copy_(refit)
        expected = source(**inputs).logits
        got = pruned(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4)
    # What the refit promises, layer by layer: on held-out rows' inputs, each pruned MLP
    # reproduces the source's MLP output better than the plain cut does. (End to end, on
    # a 4-layer model trained 120 steps, the two are within noise of each other.)
    full = lm(models["llama"])
    for index, error in enumerate(mlp_errors(full, {"refit": pruned, "cut": cut}, inputs)):
        assert error["refit"] < error["cut"] * 0.9, (index, error)


def mlp_errors(
    source: Any, others: dict[str, Any], inputs: dict[str, torch.Tensor]
) -> list[dict[str, float]]:
    """Per layer, the mean squared error of each model's MLP against the source's MLP on
    the inputs the source's MLP sees for `inputs` (padding left out)."""
    seen: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        for layer in source.model.layers
    ]
    with torch.no_grad():
        source(**inputs)
        for hook in hooks:
            hook.remove()
        mask = inputs["attention_mask"].bool()
        errors = []
        for index, hidden in enumerate(seen):
            want = source.model.layers[index].mlp(hidden)[mask]
            errors.append(
                {
                    name: float(((model.model.layers[index].mlp(hidden)[mask] - want) ** 2).mean())
                    for name, model in others.items()
                }
            )
    return errors


def test_gpt2_keeps_its_heads_and_loses_mlp_channels(
    models: dict[str, Path], tmp_path: Path
) -> None:
    work, _ = run_prune(models["gpt2"], tmp_path / "out", sparsity=0.3)

    source, pruned = lm(models["gpt2"]), lm(tmp_path / "out")
    # GPT-2's config ties head size to n_embd / n_head: the channels take the whole 30%.
    assert pruned.config.n_head == 4
    # 30% of (4 * 128^2 + 2 * 128 * 512) is 230 channels of 2 * 128: 512 - 230, to 8s.
    assert pruned.config.n_inner == 280
    assert "heads_note" in work.notes
    assert work.notes["prunable_parameters"]["removed_fraction"] == pytest.approx(0.3, abs=0.02)
    assert weights_bytes(tmp_path / "out") < weights_bytes(models["gpt2"])
    assert work.notes["channel_selection"]["method"] == "obs_least_squares"
    pairs = list(zip(source.transformer.h, pruned.transformer.h, strict=True))
    inputs = ids(tmp_path / "out", HELD_OUT)
    with torch.no_grad():
        full = source(**inputs).logits
        refits = []
        for big, small in pairs:
            # Conv1D stores (in, out): a channel is a column of c_fc and a row of c_proj.
            channels = kept_rows(small.mlp.c_fc.weight.T, big.mlp.c_fc.weight.T)
            removed = [c for c in range(512) if c not in channels]
            big.mlp.c_proj.weight[removed, :] = 0
            refit = torch.zeros_like(big.mlp.c_proj.weight)
            refit[channels, :] = small.mlp.c_proj.weight
            refits.append(refit)
        cut = source(**inputs).logits
        # The kept channels' weights were refit and what changed on average moved into the
        # bias; the rest of the model is unchanged.
        for (big, small), refit in zip(pairs, refits, strict=True):
            big.mlp.c_proj.weight.copy_(refit)
            big.mlp.c_proj.bias.copy_(small.mlp.c_proj.bias)
        got = pruned(**inputs).logits
        assert torch.allclose(got, source(**inputs).logits, atol=1e-4)
    assert (got - full).abs().mean() < (cut - full).abs().mean()


def test_obs_drops_redundant_channels_and_refits_the_rest_to_make_up_for_them() -> None:
    # 8 channels, 3 of them mixes of the other 5: with the rest refit, removing 3 loses
    # next to nothing, where keeping the 5 largest-weight channels as they were loses a lot.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, 5, generator=g, dtype=torch.float64)
    x = torch.cat([base, base @ torch.randn(5, 3, generator=g, dtype=torch.float64)], dim=1)
    weight = torch.randn(6, 8, generator=g, dtype=torch.float64)
    target = x @ weight.T
    hessian = x.T @ x / len(x) + 1e-6 * torch.eye(8, dtype=torch.float64)

    keep, refit = obs_select(weight, hessian, 5)

    assert keep.tolist() == sorted(keep.tolist())
    assert refit.shape == (6, 5)
    error = (x[:, keep] @ refit.T - target).square().mean() / target.square().mean()
    assert error < 1e-4
    largest = weight.norm(dim=0).topk(5).indices
    plain = (x[:, largest] @ weight[:, largest].T - target).square().mean()
    assert plain / target.square().mean() > 0.05


def test_layers_are_dropped_keeping_the_first_and_the_last(
    models: dict[str, Path], tmp_path: Path
) -> None:
    work, _ = run_prune(models["gpt2"], tmp_path / "out", sparsity=0.5, target="layers")

    source, pruned = lm(models["gpt2"]), lm(tmp_path / "out")
    keep = work.notes["layers_kept"]
    assert pruned.config.n_layer == 2
    assert len(keep) == 2
    assert keep[0] == 0
    assert keep[-1] == 3
    assert count(pruned) < count(source) * 0.65
    assert weights_bytes(tmp_path / "out") < weights_bytes(models["gpt2"]) * 0.65
    with torch.no_grad():
        source.transformer.h = torch.nn.ModuleList([source.transformer.h[i] for i in keep])
        inputs = ids(tmp_path / "out", HELD_OUT)
        assert torch.allclose(pruned(**inputs).logits, source(**inputs).logits, atol=1e-5)


def kd_to_source(source: Any, result: Any, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        teacher = torch.log_softmax(source(**inputs).logits / 2, dim=-1)
        student = torch.log_softmax(result(**inputs).logits / 2, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    mask = inputs["attention_mask"].float()
    return float((kl * mask).sum() / mask.sum())


def test_recovery_lowers_the_kd_loss_to_the_source(models: dict[str, Path], tmp_path: Path) -> None:
    run_prune(models["llama"], tmp_path / "plain", sparsity=0.5)
    work, losses = run_prune(
        models["llama"],
        tmp_path / "recovered",
        sparsity=0.5,
        recovery_steps=24,
        learning_rate=5e-4,
    )

    assert len(losses) == 24
    assert sum(losses[-4:]) < sum(losses[:4]) * 0.8
    assert work.notes["recovery"]["steps"] == 24
    source = lm(models["llama"])
    inputs = ids(models["llama"], HELD_OUT)
    before = kd_to_source(source, lm(tmp_path / "plain"), inputs)
    after = kd_to_source(source, lm(tmp_path / "recovered"), inputs)
    assert after < before * 0.85


def embed(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embeddings_prune_keeps_the_sentence_transformers_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _work, losses = run_prune(
        minilm_dir(),
        out,
        task="embeddings",
        sparsity=0.3,
        recovery_steps=3,
        texts=SENTENCES,
        batch_size=16,
    )

    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_text() == (minilm_dir() / name).read_text()
    assert (out / "vocab.txt").exists()
    assert (out / "tokenizer.json").exists()
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    source = AutoModel.from_pretrained(str(minilm_dir()), use_safetensors=True).eval()
    pruned = AutoModel.from_pretrained(str(out), use_safetensors=True).eval()
    assert pruned.config.intermediate_size == 848  # from 1536: 30% of attention + MLP
    assert pruned.config.num_attention_heads == 12
    assert count(source) - count(pruned) == pytest.approx(0.3 * 6 * 12 * 384 * 384, rel=0.02)
    assert weights_bytes(out) < weights_bytes(minilm_dir()) * 0.88
    assert len(losses) == 3
    inputs = ids(out, HELD_OUT[:4])
    cosine = (embed(source, inputs) * embed(pruned, inputs)).sum(-1)
    assert bool((cosine > 0.5).all())


def test_a_classifier_drops_layers_and_keeps_its_labels(tmp_path: Path) -> None:
    labels = [i % 2 for i in range(len(SENTENCES))]
    work, losses = run_prune(
        minilm_dir(),
        tmp_path / "out",
        task="classification",
        sparsity=0.34,
        target="layers",
        recovery_steps=2,
        texts=SENTENCES,
        train_labels=labels,
        labels=("negative", "positive"),
    )

    model = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "out"), use_safetensors=True
    )
    assert model.config.num_hidden_layers == 4
    assert work.notes["layers_kept"][0] == 0
    assert work.notes["layers_kept"][-1] == 5
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        logits = model(**ids(tmp_path / "out", SENTENCES[:3])).logits
    assert logits.shape == (3, 2)
    assert bool(torch.isfinite(logits).all())
    assert len(losses) == 2


def test_an_exception_from_step_stops_recovery(models: dict[str, Path], tmp_path: Path) -> None:
    seen: list[int] = []

    def step(index: int, total: int, loss: float | None) -> None:
        seen.append(index)
        if index == 2:
            raise Cancelled

    work = Work(
        task="causal_lm",
        method="prune",
        source_dir=models["llama"],
        out_dir=tmp_path / "out",
        options={"sparsity": 0.5, "recovery_steps": 10},
        device=CPU,
        train_texts=TEXTS,
        step=step,
    )
    with pytest.raises(Cancelled):
        prune(work)
    assert seen == [1, 2]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({}, "sparsity"),
        ({"sparsity": 0}, "sparsity"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": "half"}, "sparsity"),
        ({"sparsity": True}, "sparsity"),
        ({"sparsity": 0.3, "target": "rows"}, "target"),
        ({"sparsity": 0.3, "recovery_steps": -1}, "recovery_steps"),
        ({"sparsity": 0.3, "recovery_steps": 2.5}, "recovery_steps"),
        ({"sparsity": 0.3, "learning_rate": 0}, "learning_rate"),
        ({"sparsity": 0.3, "batch_size": 0}, "batch_size"),
        ({"sparsity": 0.3, "max_seq_len": 1}, "max_seq_len"),
        # Every head of 4 (round(4 * 0.1) == 0), no layer of 4, or the first or last one.
        ({"sparsity": 0.9}, "sparsity"),
        ({"sparsity": 0.05, "target": "layers"}, "sparsity"),
        ({"sparsity": 0.7, "target": "layers"}, "sparsity"),
    ],
)
def test_bad_options_name_the_option(
    models: dict[str, Path], tmp_path: Path, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(CompressionError) as raised:
        run_prune(models["llama"], tmp_path / "out", **options)
    assert raised.value.param == param
    assert raised.value.code == "invalid_options"
    assert not (tmp_path / "out").exists()
