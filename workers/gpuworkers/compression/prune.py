"""Structured pruning: remove attention heads and MLP channels, or whole layers, for real.

The result is smaller tensors that the model's own config describes, so a plain
`from_pretrained(out)` builds it: every layer keeps the same number of heads and channels
(chosen per layer on the job's rows), `intermediate_size` / `n_inner` shrink, a
Llama-style config gets an explicit `head_dim` with fewer heads (whole KV groups, or the
same number of query heads in every group, so GQA stays consistent), and dropped layers
lower `num_hidden_layers`.

MLP channels are chosen and compensated as in OBS / SparseGPT (`channels`): layer by
layer, the channels whose removal changes the down projection's output least on the
calibration rows go, and the remaining weights (and the bias) are refit by least squares
to make up for them.

BERT and GPT-2 keep all their heads: their configs tie the head size to
`hidden_size / num_attention_heads` and the installed transformers (5.x) no longer has
`pruned_heads`, so no config describes fewer heads of the same size; their whole budget
goes to MLP channels.

`sparsity` is the fraction of the prunable parameters removed (approximately): the
attention and MLP projections of every layer; embeddings and norms are never pruned.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gpuworkers.compression import channels, recovery
from gpuworkers.compression.context import CompressionError, Work
from jobcontracts.compression import PRUNE_TARGETS


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its layers and projections (state-dict names under a layer)."""

    layers: str  # the ModuleList of blocks, relative to the base model
    heads_removable: bool
    #: MLP (name, axis of the channel in the weight) for the projections into and out of it.
    mlp_in: tuple[tuple[str, int], ...]
    mlp_out: tuple[str, int]
    #: The module whose input is the concatenated per-head attention output.
    attn_out: str = ""
    #: The LayerNorm right after the MLP's residual sum (post-norm families), else "".
    mlp_norm: str = ""


_LLAMA = Layout(
    "layers",
    True,
    (("mlp.gate_proj", 0), ("mlp.up_proj", 0)),
    ("mlp.down_proj", 1),
    "self_attn.o_proj",
)
LAYOUTS: dict[str, Layout] = {
    "bert": Layout(
        "encoder.layer",
        False,
        (("intermediate.dense", 0),),
        ("output.dense", 1),
        "attention.output.dense",
        "output.LayerNorm",
    ),
    # Conv1D stores weights as (in, out): the channel axis is the other way round.
    "gpt2": Layout("h", False, (("mlp.c_fc", 1),), ("mlp.c_proj", 0), "attn.c_proj"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def layout_of(model: Any) -> Layout:
    family = str(getattr(model.config, "model_type", ""))
    if family not in LAYOUTS:
        raise CompressionError(
            "unsupported_model",
            f"{family or 'this model'} can not be pruned; supported: {', '.join(LAYOUTS)}",
        )
    return LAYOUTS[family]


def _prefix(state: dict[str, torch.Tensor], layout: Layout) -> str:
    """The state-dict path of the layer list ('bert.encoder.layer.' in a classifier)."""
    pattern = re.compile(rf"^((?:\w+\.)*?){re.escape(layout.layers)}\.0\.")
    for key in state:
        match = pattern.match(key)
        if match:
            return match.group(1) + layout.layers + "."
    raise CompressionError("unsupported_model", "the model's layers were not found")


def _modules(model: Any, layout: Layout) -> list[Any]:
    layers: Any = model.base_model
    for part in layout.layers.split("."):
        layers = getattr(layers, part)
    return list(layers)


@contextmanager
def only_layers(model: Any, keep: list[int]) -> Iterator[Any]:
    """`model` running only its layers `keep` (in order) while inside, nothing copied: for
    trying out which layers a smaller model could keep. Forwards need `use_cache=False`."""
    layout = layout_of(model)
    *path, name = layout.layers.split(".")
    parent: Any = model.base_model
    for part in path:
        parent = getattr(parent, part)
    everything = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList([everything[i] for i in keep]))
    try:
        yield model
    finally:
        setattr(parent, name, everything)


def rebuild(model: Any, config: Any, state: dict[str, torch.Tensor]) -> Any:
    """A fresh model of `model`'s class built from `config`, holding `state` exactly:
    proof that the config describes the new shapes (strict load)."""
    parameter = next(model.parameters())
    with torch.device(parameter.device):
        new = type(model)(config)
    new.load_state_dict(state, strict=True)
    new.to(dtype=parameter.dtype)
    new.eval()
    return new


def keep_layers(model: Any, keep: list[int]) -> Any:
    """`model` with only the layers `keep` (in order), renumbered."""
    layout = layout_of(model)
    state = model.state_dict()
    prefix = _prefix(state, layout)
    renumber = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.*)$")
    kept: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = pattern.match(key)
        if match is None:
            kept[key] = tensor
        elif int(match.group(1)) in renumber:
            kept[f"{prefix}{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    config = copy.deepcopy(model.config)
    before = int(config.num_hidden_layers)
    # Per-layer settings (e.g. layer_types of sliding-window attention) follow their layers.
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == before and "layer" in name:
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return rebuild(model, config, kept)


# -- importance ---------------------------------------------------------------------------


@contextmanager
def _inputs_of(modules: list[Any]) -> Iterator[list[list[torch.Tensor]]]:
    """Collect the input of each module on every forward (detached)."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []
    for index, module in enumerate(modules):

        def hook(_: Any, args: tuple[Any, ...], index: int = index) -> None:
            seen[index].append(args[0].detach().float())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _submodule(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass
class Importance:
    #: (layers, heads): mean norm of each head's share of the attention output.
    heads: torch.Tensor | None
    #: (layers,): 1 - cos(layer input, layer output), how much a layer changes its input.
    layers: torch.Tensor


def _head_shares(context: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, heads): the norm of what each head adds to the attention output, from the
    output projection's input (B, T, heads * head_dim) and weight (hidden, same)."""
    heads = weight.shape[1] // head_dim
    return torch.stack(
        [
            (
                context[..., h * head_dim : (h + 1) * head_dim]
                @ weight[:, h * head_dim : (h + 1) * head_dim].T
            ).norm(dim=-1)
            for h in range(heads)
        ],
        dim=-1,
    )


def importance(model: Any, batches: list[recovery.Batch], head_dim: int) -> Importance:
    """Scores of heads and layers over `batches`, masked to real tokens."""
    layout = layout_of(model)
    blocks = _modules(model, layout)
    attn = [_submodule(b, layout.attn_out) for b in blocks] if layout.heads_removable else []
    head_sum: torch.Tensor | None = None
    layer_sum = torch.zeros(len(blocks))
    tokens = 0.0
    with torch.no_grad(), _inputs_of(attn) as seen:
        for batch in batches:
            for captured in seen:
                captured.clear()
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
            )
            mask = batch.attention_mask.float()[..., None]
            tokens += float(mask.sum())
            if attn:
                heads = torch.stack(
                    [
                        (_head_shares(seen[i][0], m.weight.detach().float(), head_dim) * mask).sum(
                            dim=(0, 1)
                        )
                        for i, m in enumerate(attn)
                    ]
                ).cpu()
                head_sum = heads if head_sum is None else head_sum + heads
            hidden = out.hidden_states
            for i in range(len(blocks)):
                cosine = torch.nn.functional.cosine_similarity(
                    hidden[i].float(), hidden[i + 1].float(), dim=-1
                )
                layer_sum[i] += float(((1 - cosine) * mask[..., 0]).sum())
    if not batches:
        raise CompressionError("training_data_required", "no texts to score the model on")
    tokens = max(tokens, 1.0)
    return Importance(
        heads=None if head_sum is None else head_sum / tokens,
        layers=layer_sum / tokens,
    )


# -- MLP channels ------------------------------------------------------------------------


def compensated_channels(
    model: Any, batches: list[recovery.Batch], kept: int
) -> list[torch.Tensor]:
    """Each layer's kept channels, layer by layer (`channels.compensate`); `model`'s down
    projections are refit in place."""
    layout = layout_of(model)
    name, axis = layout.mlp_out
    kept_per_layer = []
    for block in _modules(model, layout):
        norm = _submodule(block, layout.mlp_norm) if layout.mlp_norm else None
        down = _submodule(block, name)
        kept_per_layer.append(channels.compensate(model, down, axis, norm, batches, kept))
    return kept_per_layer


# -- slicing ------------------------------------------------------------------------------


def _take(tensor: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(axis, index.to(tensor.device)).contiguous()


def _slice_mlp(
    state: dict[str, torch.Tensor],
    layer: str,
    layout: Layout,
    keep: torch.Tensor,
) -> None:
    """Keep channels `keep` of a layer's MLP (its down projection already refit to them)."""
    for name, axis in layout.mlp_in:
        state[f"{layer}{name}.weight"] = _take(state[f"{layer}{name}.weight"], axis, keep)
        if f"{layer}{name}.bias" in state:
            state[f"{layer}{name}.bias"] = _take(state[f"{layer}{name}.bias"], 0, keep)
    name, axis = layout.mlp_out
    state[f"{layer}{name}.weight"] = _take(state[f"{layer}{name}.weight"], axis, keep)


def _rows(units: list[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + j for u in units for j in range(size)], dtype=torch.long)


def _slice_heads(
    state: dict[str, torch.Tensor],
    layer: str,
    heads: list[int],
    groups: list[int],
    head_dim: int,
) -> None:
    """Llama-style attention: query heads `heads` (grouped by kept KV group, in order) and
    KV heads `groups`."""
    query, kv = _rows(heads, head_dim), _rows(groups, head_dim)
    for name, index in (("q_proj", query), ("k_proj", kv), ("v_proj", kv)):
        key = f"{layer}self_attn.{name}"
        state[f"{key}.weight"] = _take(state[f"{key}.weight"], 0, index)
        if f"{key}.bias" in state:
            state[f"{key}.bias"] = _take(state[f"{key}.bias"], 0, index)
    key = f"{layer}self_attn.o_proj.weight"
    state[key] = _take(state[key], 1, query)


# -- the budget ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def per_head(self) -> int:  # a query head: its rows of q and its columns of o
        return 2 * self.hidden * self.head_dim

    @property
    def per_group(self) -> int:  # a KV head: its rows of k and v
        return 2 * self.hidden * self.head_dim

    def per_channel(self, layout: Layout) -> int:
        return (len(layout.mlp_in) + 1) * self.hidden

    def attention(self, heads: int, groups: int) -> int:
        return heads * self.per_head + groups * self.per_group

    def prunable(self, layout: Layout) -> int:
        return self.attention(self.heads, self.kv_heads) + self.intermediate * self.per_channel(
            layout
        )


def _shape(config: Any, layout: Layout) -> Shape:
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = getattr(config, "intermediate_size", None)
    if intermediate is None:  # GPT-2: n_inner, 4 * hidden when unset
        intermediate = getattr(config, "n_inner", None) or 4 * hidden
    return Shape(heads, kv, head_dim, int(intermediate), hidden)


def _heads_plan(shape: Shape, sparsity: float) -> tuple[int, int]:
    """(KV groups kept, query heads kept per group) closest to removing `sparsity` of the
    attention parameters."""
    if round(shape.heads * (1 - sparsity)) < 1:
        raise CompressionError(
            "invalid_options",
            f"sparsity {sparsity:g} would remove every attention head ({shape.heads} per "
            "layer); use a lower sparsity or target 'layers'",
            param="sparsity",
        )
    per_group = shape.heads // shape.kv_heads
    goal = shape.attention(shape.heads, shape.kv_heads) * (1 - sparsity)
    options = [
        (abs(shape.attention(g * q, g) - goal), -(g * q), g, q)
        for g in range(1, shape.kv_heads + 1)
        for q in range(1, per_group + 1)
    ]
    _, _, groups, per = min(options)
    return groups, per


def _channels_plan(shape: Shape, layout: Layout, sparsity: float, attention_removed: int) -> int:
    goal = sparsity * shape.prunable(layout) - attention_removed
    remove = max(0, round(goal / shape.per_channel(layout)))
    kept = shape.intermediate - remove
    if kept >= 64:
        kept = max(8, round(kept / 8) * 8)  # multiples of 8 keep GPU matrix kernels fast
    if kept < 1:
        raise CompressionError(
            "invalid_options",
            f"sparsity {sparsity:g} would remove every MLP channel ({shape.intermediate} per "
            "layer); use a lower sparsity",
            param="sparsity",
        )
    return min(kept, shape.intermediate)


def prune_heads_and_channels(
    model: Any, batches: list[recovery.Batch], sparsity: float
) -> tuple[Any, dict[str, Any]]:
    layout = layout_of(model)
    shape = _shape(model.config, layout)
    state = model.state_dict()
    prefix = _prefix(state, layout)
    layers = int(model.config.num_hidden_layers)
    config = copy.deepcopy(model.config)
    notes: dict[str, Any] = {"target": "heads_and_channels", "sparsity": sparsity}
    attention_removed = 0
    scores = importance(model, batches, shape.head_dim) if layout.heads_removable else None
    if scores is not None and scores.heads is not None:
        groups, per = _heads_plan(shape, sparsity)
        attention_removed = shape.attention(shape.heads, shape.kv_heads) - shape.attention(
            groups * per, groups
        )
        size = shape.heads // shape.kv_heads
        kept_heads = []
        for layer in range(layers):
            head_scores = scores.heads[layer]
            by_group = head_scores.reshape(shape.kv_heads, size)
            chosen_groups = sorted(by_group.sum(dim=1).topk(groups).indices.tolist())
            heads = [
                g * size + int(h)
                for g in chosen_groups
                for h in sorted(by_group[g].topk(per).indices.tolist())
            ]
            _slice_heads(state, f"{prefix}{layer}.", heads, chosen_groups, shape.head_dim)
            kept_heads.append(heads)
        config.head_dim = shape.head_dim
        config.num_attention_heads = groups * per
        config.num_key_value_heads = groups
        notes["heads_per_layer"] = {"before": shape.heads, "after": groups * per}
        notes["kv_heads_per_layer"] = {"before": shape.kv_heads, "after": groups}
        notes["heads_kept"] = kept_heads
    else:
        notes["heads_per_layer"] = {"before": shape.heads, "after": shape.heads}
        notes["heads_note"] = (
            "heads kept: this family's config ties the head size to hidden_size / "
            "num_attention_heads, so the MLP channels take the whole budget"
        )
    kept = _channels_plan(shape, layout, sparsity, attention_removed)
    # A copy (with its heads already cut) whose down projections are refit in place, layer
    # by layer: the source stays as it is, the teacher of the recovery.
    working = rebuild(model, config, state)
    keeps = compensated_channels(working, batches, kept)
    state = working.state_dict()
    for layer, keep in enumerate(keeps):
        _slice_mlp(state, f"{prefix}{layer}.", layout, keep)
    notes["channel_selection"] = {
        "method": "obs_least_squares",
        "calibration_rows": sum(int(b.input_ids.shape[0]) for b in batches),
        "calibration_tokens": sum(int(b.attention_mask.sum()) for b in batches),
    }
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = kept
    else:
        config.n_inner = kept
    notes["intermediate_size"] = {"before": shape.intermediate, "after": kept}
    after = Shape(
        int(config.num_attention_heads),
        int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        shape.head_dim,
        kept,
        shape.hidden,
    )
    before_count = shape.prunable(layout) * layers
    notes["prunable_parameters"] = {
        "before": before_count,
        "after": after.prunable(layout) * layers,
        "removed_fraction": round(1 - after.prunable(layout) / shape.prunable(layout), 4),
    }
    return rebuild(working, config, state), notes


def prune_layers(
    model: Any, batches: list[recovery.Batch], sparsity: float
) -> tuple[Any, dict[str, Any]]:
    layers = int(model.config.num_hidden_layers)
    remove = round(sparsity * layers)
    if remove < 1:
        raise CompressionError(
            "invalid_options",
            f"sparsity {sparsity:g} removes no layer of {layers}; use at least {0.5 / layers:.2g}",
            param="sparsity",
        )
    if layers - remove < 2:
        raise CompressionError(
            "invalid_options",
            f"sparsity {sparsity:g} would remove {remove} of {layers} layers; the first and "
            "the last are always kept",
            param="sparsity",
        )
    layout = layout_of(model)
    scores = importance(model, batches, _shape(model.config, layout).head_dim).layers
    middle = list(range(1, layers - 1))
    dropped = sorted(middle, key=lambda i: float(scores[i]))[:remove]
    keep = [i for i in range(layers) if i not in dropped]
    notes = {
        "target": "layers",
        "sparsity": sparsity,
        "num_layers": {"before": layers, "after": len(keep)},
        "layers_kept": keep,
        "layer_importance": [round(float(s), 5) for s in scores],
    }
    return keep_layers(model, keep), notes


# -- the method ---------------------------------------------------------------------------


def prune(work: Work) -> None:
    options = work.options
    sparsity = recovery.option_float(options, "sparsity", None, low=0.0, high=1.0, high_open=True)
    target = options.get("target") or "heads_and_channels"
    if target not in PRUNE_TARGETS:
        raise recovery.bad_option(
            "target", f"target must be one of {', '.join(PRUNE_TARGETS)}, got {target!r}"
        )
    steps = recovery.option_int(options, "recovery_steps", 0, minimum=0)
    schedule = recovery.Schedule(
        steps=steps,
        learning_rate=recovery.option_float(options, "learning_rate", 1e-4, low=0.0, high=1.0),
        batch_size=recovery.option_int(options, "batch_size", 8, minimum=1),
        max_seq_len=recovery.option_int(options, "max_seq_len", 128, minimum=2),
        temperature=2.0,
        alpha=0.5,
    )
    torch.manual_seed(work.seed)
    tokenizer = recovery.load_tokenizer(work.source_dir)
    source = recovery.load_model(work, work.source_dir, tokenizer)
    layout_of(source)
    # Channel statistics come from the job's rows (the built-in texts without any): they
    # are fit to, so their tokens count as trained on.
    calibration = list(work.train_texts[: channels.CALIBRATION_ROWS]) or list(
        recovery.FALLBACK_TEXTS
    )
    batches = recovery.make_batches(
        tokenizer,
        calibration,
        batch_size=schedule.batch_size,
        max_len=schedule.max_seq_len,
        device=work.device,
        seed=work.seed,
    )
    cut = prune_heads_and_channels if target == "heads_and_channels" else prune_layers
    pruned, notes = cut(source, batches, sparsity)
    notes["parameters"] = {
        "before": recovery.parameter_count(source),
        "after": recovery.parameter_count(pruned),
    }
    if steps:
        texts, labels = list(work.train_texts), list(work.train_labels)
        if not texts and work.task == "causal_lm":
            texts = recovery.generate_texts(
                source,
                tokenizer,
                rows=64,
                max_new_tokens=min(64, schedule.max_seq_len),
                seed=work.seed,
            )
            notes["recovery_texts"] = "generated by the source model"
        if not texts:
            raise CompressionError(
                "training_data_required",
                "recovery needs training rows: add training data or set recovery_steps to 0",
                param="recovery_steps",
            )
        trained = recovery.train(
            pruned,
            source,
            work,
            tokenizer=tokenizer,
            texts=texts,
            labels=labels if work.task == "classification" else (),
            schedule=schedule,
            pooling=recovery.pooling_of(work.source_dir),
        )
        notes["recovery"] = {
            "steps": steps,
            "loss_first": round(trained.losses[0], 6),
            "loss_last": round(trained.losses[-1], 6),
            "tokens": trained.tokens,
        }
    # What a data partner's rows were used for: the channel statistics (fit to them) and
    # every recovery step (generated texts are nobody's rows, but still trained on).
    fit = notes.get("channel_selection", {}).get("calibration_tokens", 0)
    used = fit if work.train_texts else 0  # the built-in texts are nobody's rows
    notes["trained_tokens"] = int(used) + int(notes.get("recovery", {}).get("tokens", 0))
    work.notes.update(notes)
    recovery.save_result(pruned, work)
