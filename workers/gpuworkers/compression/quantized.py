"""The quantized-artifact format: how `quantize` writes a model and how workers load it back.

A quantized artifact is an ordinary Hugging Face directory (config.json, tokenizer and
sentence-transformers files) whose `model.safetensors` holds, for every quantized module
`m`, `m.qweight` (int8 or float8_e4m3fn, [out, in]) and `m.scale` (float32, [out]) in
place of `m.weight`, beside every other tensor unchanged. `QUANTIZATION_FILE` names those
modules, so a loader needs nothing else (no hub, no re-quantizing):

    {"format": "atelier-quantized", "version": 1, "weights": "int8" | "fp8" | "bf16",
     "kind": "causal" | "encoder" | "classifier", "scheme": "...",
     "linear": {module: {"dtype", "bias": bool, "transposed": bool, "tied_to"?: module}},
     "embedding": {module: {"dtype"}}, "tied": {key: key it shares storage with},
     "compute": {"cpu": ..., "cuda": ...}}

Scheme: symmetric, one scale per output channel (per row of an embedding table), zero
point 0; int8 scale = absmax / 127, fp8 scale = absmax / 448. A tied output head (GPT-2's
`lm_head` is `wte`) stores nothing of its own: it is rebuilt from the embedding's rows,
which are exactly its output channels, so the tie survives quantization. GPT-2's `Conv1D`
layers ([in, out]) are stored transposed like any Linear.

Compute. CPU int8 uses torch.ao's dynamic-quantization Linear kernel (fbgemm): the int8
weights are packed once at load (`torch._make_per_channel_quantized_tensor` +
`quantized.linear_prepack`) and each call quantizes its input to uint8 per tensor and runs
an int8 GEMM. Measured on the real all-MiniLM-L6-v2 (every Linear int8), 2 threads, batch
16 x 128 tokens / batch 1, median of a warmed-up run, fp32 = 347 ms / 29.0 ms:

    fbgemm dynamic            225 ms (1.54x) / 18.3 ms (1.58x)
    x86 engine dynamic        257 ms (1.35x) / 22.9 ms (1.26x)
    onednn dynamic            249 ms (1.39x) / 23.8 ms (1.22x)
    torch._weight_int8pack_mm 27.3 s (0.01x, fp32 input) / 713 ms (0.49x, bf16 input)
    torchao 0.18 int8 dynamic 607 ms (0.57x); int8 weight-only 319 ms (1.09x) / 0.79x

so fbgemm it is (torchao is not a dependency either). Activations are always quantized
with the full 8-bit range (`reduce_range=False`): fbgemm's 7-bit default costs accuracy
(MiniLM cosine to fp32 over 32 sentences 0.974 -> 0.992) and only guards the int16
saturation of pre-VNNI AVX2 `vpmaddubsw` (u8 x s8 pairs summed into int16). Without VNNI
the weights are halved to 7 bits at load instead (scale x 2, values in [-64, 63]), so
255 x 64 x 2 still fits: a per-channel weight loses far less to one bit than a per-tensor
activation does (MiniLM cosine on the bench's 256 sentences, AVX2-only AMD EPYC: 7-bit
activations 0.976, 7-bit weights 0.992). A CPU without fbgemm (ARM) falls back to
dequantize-then-matmul.

One scale per tensor means a row's result depends a little on the rows batched with it
(MiniLM embedding components moved by up to 0.027 between alone and in a batch of 32).
Per-row activation scales (each row divided by its absmax, plus an anchor row pinning
fbgemm's range to [-1, 1]) remove that and lift the cosine to 0.997, but the extra passes
over input and output cost a third of the time (0.71x fp32 at batch 16 on a loaded
machine, against 0.95x for per tensor in the same run), which misses the 1.3x target.

CUDA int8 is weight-only. A decode step (up to 16 rows) runs `torch._weight_int8pack_mm`,
which reads the int8 bytes directly (one warp per output, so it re-reads the weight for
every row); a prefill widens the int8 weight to the activation dtype and multiplies with
cuBLAS, the scale applied to the output (exact: the scale is per output channel). Neither
GPU path could be timed here (no GPU in this build's sessions): they are chosen as kernels
that exist in torch 2.13's CUDA build, and fall back to widening if one refuses its inputs.
fp8 uses `torch._scaled_mm` with row-wise scales (activations quantized per
token) on a GPU of compute capability >= 8.9 when both dimensions are multiples of 16, and
dequantizes elsewhere (older GPUs, CPU). Embedding rows are gathered in their stored
dtype and dequantized after the gather, so the table stays 1 byte per weight.
"""

from __future__ import annotations

import contextlib
import json
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn

from gpuworkers import safeload
from jobcontracts.compression import QUANTIZATION_FILE

FORMAT: Final = "atelier-quantized"
VERSION: Final = 1
WEIGHTS_FILE: Final = "model.safetensors"
#: Model kinds, the same strings as gpuworkers.inference.models.CAUSAL/ENCODER/CLASSIFIER.
CAUSAL: Final = "causal"
ENCODER: Final = "encoder"
CLASSIFIER: Final = "classifier"
KINDS: Final = (CAUSAL, ENCODER, CLASSIFIER)
#: Stored dtype of the quantized tensors, by `weights` option.
STORED_DTYPES: Final = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX: Final = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
_DTYPE_NAMES: Final = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
#: Rows up to which a GPU int8 Linear reads its int8 weight directly (decode steps).
INT8PACK_MAX_ROWS: Final = 16
SCHEME: Final = "symmetric per output channel (per row), float32 scale = absmax / qmax"
COMPUTE: Final = {
    "int8": {
        "cpu": "torch.ao dynamic int8 Linear (fbgemm), activations uint8 per tensor",
        "cuda": "weight-only int8: torch._weight_int8pack_mm up to 16 rows, else widen "
        "to the activation dtype, cuBLAS matmul, scale the output",
    },
    "fp8": {
        "cpu": "dequantize to activation dtype, then matmul",
        "cuda": "torch._scaled_mm row-wise (sm >= 8.9), activations fp8 per token",
    },
    "bf16": {"cpu": "dense bf16 weights", "cuda": "dense bf16 weights"},
}

# torch.backends.quantized.engine is process-wide; packing reads it.
_ENGINE_LOCK = threading.Lock()


class QuantizedFormatError(ValueError):
    """A directory whose QUANTIZATION_FILE or tensors do not describe a loadable model."""


# -- the arithmetic -----------------------------------------------------------------------


def quantize_rows(weight: torch.Tensor, stored: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): `weight` [rows, cols] as `stored` values with one float32 scale per row,
    symmetric (zero point 0); q * scale[:, None] approximates `weight`."""
    w = weight.detach().float()
    qmax = _QMAX[stored]
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-12)
    scaled = w / scale[:, None]
    if stored == torch.int8:
        q = scaled.round().clamp(-qmax, qmax).to(torch.int8)
    else:
        q = scaled.clamp(-qmax, qmax).to(stored)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies uint8 x int8 without int16 saturation (AVX-512/AVX VNNI)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in text for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


_VNNI: bool | None = None


def _seven_bit_weights() -> bool:
    """Whether fbgemm's int8 GEMM here can saturate int16 (no VNNI): see the docstring."""
    global _VNNI
    if _VNNI is None:
        _VNNI = cpu_has_vnni()
    return not _VNNI


def seven_bit(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 weights `q` (per-channel `scale`) as 7-bit ones in [-64, 63], scale doubled."""
    halved = torch.round(q.float() / 2).clamp(-64, 63).to(torch.int8)
    return halved, scale * 2


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    with _ENGINE_LOCK:
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = name
        try:
            yield
        finally:
            torch.backends.quantized.engine = before


# -- the modules --------------------------------------------------------------------------


class DynamicInt8Linear(nn.Module):
    """CPU int8 Linear on fbgemm's packed weights (see the module docstring for why)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.seven_bit = _seven_bit_weights()
        if self.seven_bit:
            q, scale = seven_bit(q, scale)
        with warnings.catch_warnings():
            # torch marks quantized-tensor creation deprecated (pytorch#184982); it is
            # how fbgemm takes per-channel weights in 2.13, and `_linear` falls back to
            # DequantLinear if a later torch drops it.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                q.contiguous(),
                scale.double(),
                torch.zeros(q.shape[0], dtype=torch.long),
                0,
            )
        fbias = None if bias is None else bias.detach().float().contiguous()
        with _engine("fbgemm"):
            self._packed = torch.ops.quantized.linear_prepack(qweight, fbias)
        #: What the packed weights occupy (not a parameter or buffer, so counted here).
        self.packed_nbytes = (
            q.numel() + scale.numel() * 4 + (0 if fbias is None else fbias.numel() * 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.quantized.linear_dynamic(
            x.float().contiguous(), self._packed, False
        )
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fbgemm int8"


class DequantLinear(nn.Module):
    """Weight-only quantized Linear: the stored weight is widened inside each forward, the
    per-output-channel scale applied to the result (exact, and no scaled copy of the weight).

    On a GPU two kernels read the stored bytes directly instead, each given up for good
    (falling back to widening) the first time it refuses its inputs: fp8 weights
    `torch._scaled_mm` (`scaled_mm`), int8 weights `torch._weight_int8pack_mm` for up to
    `INT8PACK_MAX_ROWS` rows (`int8pack`: decode steps, where reading 1 byte per weight
    instead of 2 is what counts; it re-reads the weight for every row, so a prefill widens).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        dtype: torch.dtype,
        scaled_mm: bool = False,
        int8pack: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        # Not persistent: the artifact's tensors are read by load_model, never by
        # load_state_dict, and a state_dict of the served model is never written.
        self.register_buffer("qweight", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias.detach().to(dtype).contiguous(), persistent=False)
        self.scaled_mm = scaled_mm and q.dtype == torch.float8_e4m3fn
        self.int8pack = int8pack and q.dtype == torch.int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm:
            try:
                return self._fp8_forward(x)
            except RuntimeError:
                self.scaled_mm = False
        if self.int8pack and x.numel() <= INT8PACK_MAX_ROWS * self.in_features:
            try:
                return self._int8pack_forward(x)
            except RuntimeError:
                self.int8pack = False
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _int8pack_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).contiguous()
        y = torch._weight_int8pack_mm(rows, self.qweight, self.scale.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        qmax = _QMAX[torch.float8_e4m3fn]
        row_scale = (rows.abs().amax(dim=1, keepdim=True).float() / qmax).clamp(min=1e-12)
        xq = (rows.float() / row_scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(
            xq,
            self.qweight.t(),  # [in, out] column-major, as _scaled_mm wants its second operand
            scale_a=row_scale,
            scale_b=self.scale[None, :],
            out_dtype=torch.bfloat16,
        ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.qweight.dtype}{', scaled_mm' if self.scaled_mm else ''}"
        )


class QuantEmbedding(nn.Module):
    """An embedding table stored 1 byte per weight with a scale per row."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        *,
        dtype: torch.dtype,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(q.shape[0]), int(q.shape[1])
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("qweight", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather bytes first (uint8 view: index kernels exist for it on every device),
        # then widen only the rows used.
        rows = F.embedding(ids, self.qweight.view(torch.uint8)).view(self.qweight.dtype)
        return (rows.to(torch.float32) * self.scale[ids].unsqueeze(-1)).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (for code that reads `.weight`; costs a full-size copy)."""
        return dequantize_rows(self.qweight, self.scale, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qweight.dtype} per row"


def resident_bytes(model: nn.Module) -> int:
    """Bytes the loaded model holds: parameters, buffers and packed int8 weights."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        if isinstance(module, DynamicInt8Linear):
            total += module.packed_nbytes
    return total


# -- finding and replacing modules ------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return str(name)
    return None


def _input_embedding(model: Any) -> nn.Embedding | None:
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embedding if isinstance(embedding, nn.Embedding) else None


def _output_embedding(model: Any) -> nn.Module | None:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


# -- writing --------------------------------------------------------------------------------


def save(
    model: Any,
    out_dir: Path,
    *,
    weights: str,
    kind: str,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Write `model` (a transformers model in eval mode) to `out_dir` as a quantized
    artifact: config.json, generation_config.json (a causal LM), model.safetensors and
    QUANTIZATION_FILE. Quantizes on `device` (the worker's) when given. Returns the manifest.
    """
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if weights not in COMPUTE:
        raise ValueError(f"weights must be one of {', '.join(COMPUTE)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "weights": weights,
        "kind": kind,
        "scheme": SCHEME if weights in STORED_DTYPES else "dense",
        "linear": {},
        "embedding": {},
        "tied": {},
        "compute": COMPUTE[weights],
    }
    tensors: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()  # state-dict keys of quantized modules (not written as-is)
    if weights in STORED_DTYPES:
        stored = STORED_DTYPES[weights]
        stored_name = str(stored).removeprefix("torch.")
        embedding = _input_embedding(model)
        embedding_name = _module_name(model, embedding)
        head = _output_embedding(model)
        head_name = _module_name(model, head)
        if embedding is not None and embedding_name is not None:
            q, scale = quantize_rows(_on(embedding.weight, device), stored)
            tensors[f"{embedding_name}.qweight"], tensors[f"{embedding_name}.scale"] = (
                q.cpu(),
                scale.cpu(),
            )
            manifest["embedding"][embedding_name] = {"dtype": stored_name}
            replaced.add(f"{embedding_name}.weight")
        for name, module in model.named_modules():
            if not _is_linear(module):
                continue
            weight: torch.Tensor = module.weight
            bias: torch.Tensor | None = getattr(module, "bias", None)
            transposed = not isinstance(module, nn.Linear)  # Conv1D: [in, out]
            entry: dict[str, Any] = {
                "dtype": stored_name,
                "bias": bias is not None,
                "transposed": transposed,
            }
            tied = (
                embedding is not None
                and name == head_name
                and not transposed
                and weight.data_ptr() == embedding.weight.data_ptr()
                and weight.shape == embedding.weight.shape
            )
            if tied:
                entry["tied_to"] = embedding_name
            else:
                matrix = weight.t() if transposed else weight
                q, scale = quantize_rows(_on(matrix, device), stored)
                tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = q.cpu(), scale.cpu()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().cpu().contiguous()
            manifest["linear"][name] = entry
            replaced.update({f"{name}.weight", f"{name}.bias"})
    else:  # bf16: every floating tensor cast, nothing else changed
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key in replaced:
            continue
        if value.numel() and value.data_ptr() in seen:
            # Shared storage (a tie): safetensors refuses aliases; the loader re-ties.
            manifest["tied"][key] = seen[value.data_ptr()]
            continue
        if value.numel():
            seen[value.data_ptr()] = key
        tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(str(out_dir))
    generation = getattr(model, "generation_config", None)
    if kind == CAUSAL and generation is not None:
        generation.save_pretrained(str(out_dir))
    (out_dir / QUANTIZATION_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _on(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return tensor.detach() if device is None else tensor.detach().to(device)


# -- reading --------------------------------------------------------------------------------


def is_quantized(folder: Path) -> bool:
    """Whether `folder` is an artifact of this format (it holds QUANTIZATION_FILE)."""
    return (folder / QUANTIZATION_FILE).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / QUANTIZATION_FILE).read_text())
    except (OSError, ValueError) as error:
        raise QuantizedFormatError(f"unreadable {QUANTIZATION_FILE}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise QuantizedFormatError(f"{QUANTIZATION_FILE} is not of format {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise QuantizedFormatError(
            f"{QUANTIZATION_FILE} version {manifest.get('version')!r}; this worker reads {VERSION}"
        )
    if manifest.get("weights") not in COMPUTE or manifest.get("kind") not in KINDS:
        raise QuantizedFormatError(f"{QUANTIZATION_FILE} names unknown weights or kind")
    for section in ("linear", "embedding", "tied"):
        if not isinstance(manifest.get(section), dict):
            raise QuantizedFormatError(f"{QUANTIZATION_FILE} lacks {section!r}")
    return manifest


def _model_class(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {
        CAUSAL: AutoModelForCausalLM,
        ENCODER: AutoModel,
        CLASSIFIER: AutoModelForSequenceClassification,
    }[kind]


def load_model(folder: Path, *, kind: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build the model of `folder`'s config.json, put the quantized modules in place, load
    its safetensors, and return it on `device` in eval mode. Unquantized floating tensors
    take `dtype`; quantized ones keep their stored dtype and compute as the docstring says.
    An artifact quantized as a causal LM or classifier also loads as "encoder" (its base).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    manifest = read_manifest(folder)
    safeload.require_safetensors(folder)
    stored_kind = manifest["kind"]
    if stored_kind != kind and kind != ENCODER:
        raise QuantizedFormatError(f"the artifact is a {stored_kind} model, not a {kind} one")
    config = AutoConfig.from_pretrained(str(folder))
    with no_init_weights():  # every weight is read from the file: skip the random init
        model: Any = _model_class(stored_kind).from_config(config, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path), device="cpu"))

    def take(key: str) -> torch.Tensor:
        try:
            return tensors.pop(key)
        except KeyError:
            raise QuantizedFormatError(f"{WEIGHTS_FILE} lacks {key}") from None

    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, entry in manifest["embedding"].items():
        q, scale = _checked(take(f"{name}.qweight"), entry), take(f"{name}.scale")
        quantized[name] = (q, scale)
        old = model.get_submodule(name)
        padding = getattr(old, "padding_idx", None)
        emb = QuantEmbedding(q, scale, dtype=dtype, padding_idx=padding)
        _set_module(model, name, emb)
    for name, entry in manifest["linear"].items():
        source = entry.get("tied_to")
        if source:
            if source not in quantized:
                raise QuantizedFormatError(f"{name} is tied to {source}, which is not stored")
            q, scale = quantized[source]
        else:
            q, scale = _checked(take(f"{name}.qweight"), entry), take(f"{name}.scale")
        bias = take(f"{name}.bias") if entry.get("bias") else None
        _set_module(model, name, _linear(q, scale, bias, device=device, dtype=dtype))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise QuantizedFormatError(
            f"{WEIGHTS_FILE} holds tensors the model lacks: {unexpected[:5]}"
        )
    _retie(model, manifest["tied"], set(missing))
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    if kind == ENCODER and stored_kind != ENCODER:
        base: nn.Module = model.base_model
        return base
    result: nn.Module = model
    return result


def _checked(q: torch.Tensor, entry: Mapping[str, Any]) -> torch.Tensor:
    expected = _DTYPE_NAMES.get(str(entry.get("dtype")))
    if expected is None or q.dtype != expected or q.dim() != 2:
        raise QuantizedFormatError(
            f"a quantized tensor is {q.dtype}, expected {entry.get('dtype')}"
        )
    return q


def _linear(
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    if q.dtype == torch.int8:
        if device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
            try:
                return DynamicInt8Linear(q, scale, bias)
            except (AttributeError, RuntimeError):  # a torch without these kernels
                pass
        return DequantLinear(q, scale, bias, dtype=dtype, int8pack=device.type == "cuda")
    fast = (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (8, 9)
        and q.shape[0] % 16 == 0
        and q.shape[1] % 16 == 0
    )
    return DequantLinear(q, scale, bias, dtype=dtype, scaled_mm=fast)


def _retie(model: nn.Module, tied: Mapping[str, str], missing: set[str]) -> None:
    """Make each tied key the very parameter it shared storage with when saved."""
    for key, source in tied.items():
        parent_name, _, attr = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        source_parent_name, _, source_attr = source.rpartition(".")
        source_parent = model.get_submodule(source_parent_name) if source_parent_name else model
        setattr(parent, attr, getattr(source_parent, source_attr))
        missing.discard(key)
    if missing:
        raise QuantizedFormatError(f"{WEIGHTS_FILE} lacks {sorted(missing)[:5]}")
