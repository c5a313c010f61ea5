"""Request bodies of the inference endpoints, checked as strictly as OpenAI checks them.

Fields OpenAI defines that we do not implement (tools, response formats,
penalties other than 0, …) are refused with a 400 naming them rather than
silently ignored; fields that change nothing here (`user`, `store`, `metadata`)
are accepted.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from controlplane.core.serializers import StrictInputSerializer
from jobcontracts.inference import Params

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4
MAX_MESSAGES = 2048


@extend_schema_field(
    {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
)
class StringOrList(serializers.Field):  # type: ignore[type-arg]
    """A string or a list of strings (OpenAI's `input`, `prompt`, `stop`)."""

    def __init__(self, *, max_items: int, allow_empty_string: bool = False, **kwargs: Any) -> None:
        self.max_items = max_items
        self.allow_empty_string = allow_empty_string
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[str]:
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not items:
            raise serializers.ValidationError("Must be a string or a non-empty list of strings.")
        if len(items) > self.max_items:
            raise serializers.ValidationError(f"At most {self.max_items} items.")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise serializers.ValidationError(
                    f"Item {i} is {type(item).__name__}; send strings (token arrays are not "
                    "supported)."
                )
            if not item and not self.allow_empty_string:
                raise serializers.ValidationError(f"Item {i} is an empty string.")
        return list(items)

    def to_representation(self, value: Any) -> Any:
        return value


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise serializers.ValidationError(
                    f"{where}.content[{j}]: only text parts are supported "
                    '({"type": "text", "text": "…"}).'
                )
            if not isinstance(part.get("text"), str):
                raise serializers.ValidationError(f"{where}.content[{j}].text must be a string.")
            texts.append(part["text"])
        return "".join(texts)
    raise serializers.ValidationError(
        f"{where}.content must be a string or a list of text parts, not {type(content).__name__}."
    )


@extend_schema_field({"type": "array", "items": {"type": "object"}})
class Messages(serializers.Field):  # type: ignore[type-arg]
    def to_internal_value(self, data: Any) -> list[dict[str, str]]:
        if not isinstance(data, list) or not data:
            raise serializers.ValidationError("Send at least one message.")
        if len(data) > MAX_MESSAGES:
            raise serializers.ValidationError(f"At most {MAX_MESSAGES} messages.")
        out = []
        for i, message in enumerate(data):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise serializers.ValidationError(f"{where} must be an object.")
            role = message.get("role")
            if role not in ROLES:
                raise serializers.ValidationError(
                    f"{where}.role is {role!r}; use one of {', '.join(ROLES)} (tools are not "
                    "supported)."
                )
            unknown = set(message) - {"role", "content", "name"}
            if unknown:
                raise serializers.ValidationError(
                    f"{where}: unsupported field '{sorted(unknown)[0]}'."
                )
            text = _text_content(message.get("content"), where)
            out.append({"role": "system" if role == "developer" else role, "content": text})
        if out[-1]["role"] == "assistant" and len(out) == 1:
            raise serializers.ValidationError("A conversation cannot be a lone assistant message.")
        return out

    def to_representation(self, value: Any) -> Any:
        return value


class StreamOptions(StrictInputSerializer):
    include_usage = serializers.BooleanField(default=False)


class _Sampling(StrictInputSerializer):
    model = serializers.CharField(max_length=300)
    temperature = serializers.FloatField(min_value=0.0, max_value=2.0, default=1.0, allow_null=True)
    top_p = serializers.FloatField(min_value=0.0, max_value=1.0, default=1.0, allow_null=True)
    n = serializers.IntegerField(min_value=1, default=1, allow_null=True)
    stop = StringOrList(max_items=MAX_STOP, required=False, allow_null=True)
    seed = serializers.IntegerField(
        min_value=-(2**63), max_value=2**63 - 1, required=False, allow_null=True
    )
    stream = serializers.BooleanField(default=False, allow_null=True)
    stream_options = StreamOptions(required=False, allow_null=True)
    frequency_penalty = serializers.FloatField(
        min_value=-2, max_value=2, required=False, allow_null=True
    )
    presence_penalty = serializers.FloatField(
        min_value=-2, max_value=2, required=False, allow_null=True
    )
    user = serializers.CharField(max_length=256, required=False, allow_blank=True)

    def validate_n(self, value: int | None) -> int:
        value = value or 1
        if value > settings.INFERENCE_MAX_N:
            raise serializers.ValidationError(f"n may be at most {settings.INFERENCE_MAX_N}.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        for name in ("frequency_penalty", "presence_penalty"):
            if attrs.get(name):
                raise serializers.ValidationError({name: ["Only 0 is supported."]})
        attrs["stream"] = bool(attrs.get("stream"))
        if attrs.get("stream_options") and not attrs["stream"]:
            raise serializers.ValidationError(
                {"stream_options": ["Only allowed when 'stream' is true."]}
            )
        return attrs


def _cap(value: int | None, name: str) -> int | None:
    if value is not None and value > settings.INFERENCE_MAX_TOKENS_CAP:
        raise serializers.ValidationError(
            {name: [f"At most {settings.INFERENCE_MAX_TOKENS_CAP} tokens per request."]}
        )
    return value


class ChatInput(_Sampling):
    messages = Messages()
    max_tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    max_completion_tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    logprobs = serializers.BooleanField(default=False, allow_null=True)
    top_logprobs = serializers.IntegerField(
        min_value=0, max_value=20, required=False, allow_null=True
    )
    store = serializers.BooleanField(required=False, allow_null=True)
    metadata = serializers.DictField(
        child=serializers.CharField(max_length=512), required=False, allow_null=True
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if attrs.get("top_logprobs") and not attrs.get("logprobs"):
            raise serializers.ValidationError({"top_logprobs": ["Needs 'logprobs': true."]})
        tokens = _cap(attrs.get("max_completion_tokens"), "max_completion_tokens") or _cap(
            attrs.get("max_tokens"), "max_tokens"
        )
        attrs["max_tokens"] = tokens  # None: as much as the context leaves (see params_from)
        return attrs


class CompletionInput(_Sampling):
    prompt = StringOrList(max_items=settings.INFERENCE_MAX_INPUTS, allow_empty_string=True)
    max_tokens = serializers.IntegerField(min_value=1, default=16, allow_null=True)
    logprobs = serializers.IntegerField(min_value=0, max_value=5, required=False, allow_null=True)
    echo = serializers.BooleanField(default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if attrs.get("echo"):
            raise serializers.ValidationError({"echo": ["echo is not supported."]})
        attrs["max_tokens"] = _cap(attrs.get("max_tokens"), "max_tokens") or 16
        # `logprobs: 0` still asks for the sampled tokens' log-probabilities (OpenAI's
        # legacy API); only an absent or null `logprobs` asks for none.
        attrs["top_logprobs"] = attrs.get("logprobs") or 0
        attrs["logprobs"] = attrs.get("logprobs") is not None
        return attrs


class EmbeddingInput(StrictInputSerializer):
    model = serializers.CharField(max_length=300)
    input = StringOrList(max_items=settings.INFERENCE_MAX_INPUTS)
    encoding_format = serializers.ChoiceField(("float", "base64"), default="float")
    dimensions = serializers.IntegerField(
        min_value=1, max_value=65536, required=False, allow_null=True
    )
    user = serializers.CharField(max_length=256, required=False, allow_blank=True)


class ClassificationInput(StrictInputSerializer):
    model = serializers.CharField(max_length=300)
    input = StringOrList(max_items=settings.INFERENCE_MAX_INPUTS)
    user = serializers.CharField(max_length=256, required=False, allow_blank=True)


def params_from(data: dict[str, Any], *, context_length: int) -> Params:
    """Sampling parameters; without `max_tokens`, the server default within the context."""
    temperature = data.get("temperature")
    top_p = data.get("top_p")
    max_tokens = data.get("max_tokens") or min(
        settings.INFERENCE_DEFAULT_MAX_TOKENS, max(1, context_length // 2)
    )
    return Params(
        max_tokens=int(max_tokens),
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        n=int(data.get("n") or 1),
        stop=tuple(data.get("stop") or ()),
        seed=data.get("seed"),
        logprobs=bool(data.get("logprobs")),
        top_logprobs=int(data.get("top_logprobs") or 0),
    )
