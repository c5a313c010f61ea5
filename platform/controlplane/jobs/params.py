"""The create-job request: OpenAI's fields plus ours, and how "auto" is resolved.

OpenAI's `POST /v1/fine_tuning/jobs` takes `model, training_file, validation_file,
suffix, seed, metadata, method{type, supervised|dpo: {hyperparameters}}` (and the
deprecated top-level `hyperparameters`). Our extensions: `dataset` (a dataset
version id instead of a file), `adapter` (LoRA or full), `task`, `gpus`, and held-out
test data: `test_file`, or `hyperparameters.test_fraction` of the training rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from controlplane.core.errors import ApiError
from controlplane.core.serializers import StrictInputSerializer
from controlplane.modelregistry.tokens import auto_epochs
from jobcontracts.training import MAX_TEST_FRACTION

AUTO = "auto"
TASKS = ("causal_lm", "classification")
METHODS = ("supervised", "dpo")
#: Which dataset formats each (task, method) trains on.
FORMATS_FOR = {
    ("causal_lm", "supervised"): ("chat", "prompt_completion", "text"),
    ("causal_lm", "dpo"): ("preference",),
    ("classification", "supervised"): ("classification",),
}
#: Learning rate at multiplier 1.0: adapters learn well at a much higher rate than full weights.
BASE_LEARNING_RATE = {"lora": 2e-4, "full": 5e-5}
MAX_BATCH_SIZE = 256
SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
METADATA_MAX_KEYS, METADATA_KEY_MAX, METADATA_VALUE_MAX = 16, 64, 512


def metadata_checked(value: dict[str, str] | None) -> dict[str, str]:
    """A job's `metadata` (every kind of job): at most METADATA_MAX_KEYS keys of up to
    METADATA_KEY_MAX characters (the values' length is the DictField's child's)."""
    value = value or {}
    if len(value) > METADATA_MAX_KEYS or any(len(k) > METADATA_KEY_MAX for k in value):
        raise serializers.ValidationError(
            f"At most {METADATA_MAX_KEYS} keys of up to {METADATA_KEY_MAX} characters."
        )
    return value


@extend_schema_field({"oneOf": [{"type": "number"}, {"type": "string", "enum": ["auto"]}]})
class AutoOr(serializers.Field):  # type: ignore[type-arg]
    """ "auto" or a number in range (as OpenAI: `n_epochs: "auto" | int`)."""

    def __init__(self, kind: type, low: float, high: float, **kwargs: Any) -> None:
        self.kind, self.low, self.high = kind, low, high
        kwargs.setdefault("required", False)
        kwargs.setdefault("default", AUTO)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if data == AUTO:
            return AUTO
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail_msg(f'must be "auto" or a number between {self.low} and {self.high}')
        if self.kind is int and (not float(data).is_integer()):
            self.fail_msg("must be a whole number")
        if not self.low <= data <= self.high:
            self.fail_msg(f"must be between {self.low} and {self.high}")
        return self.kind(data)

    def fail_msg(self, message: str) -> None:
        raise serializers.ValidationError(message)

    def to_representation(self, value: Any) -> Any:
        return value


class SupervisedHyperparameters(StrictInputSerializer):
    n_epochs = AutoOr(int, 1, 50)
    batch_size = AutoOr(int, 1, MAX_BATCH_SIZE)
    learning_rate_multiplier = AutoOr(float, 1e-4, 100.0)
    test_fraction = serializers.FloatField(
        required=False,
        help_text=(
            "Our extension: hold out this fraction of the training rows, in (0, 0.5], as a "
            "test set (chosen by the job's seed, never trained on) and report test metrics "
            "at the end. Not with `test_file`."
        ),
    )

    group_by_length = serializers.BooleanField(
        required=False,
        help_text=(
            "Our extension: batch rows of similar length together (default true): less "
            "padding, the same rows each epoch; seeded, so a resumed job sees the same batches."
        ),
    )
    packing = serializers.BooleanField(
        required=False,
        help_text=(
            "Our extension, supervised causal-LM jobs only: pack short rows into full "
            "sequences, with no attention across rows (default false)."
        ),
    )

    def validate_test_fraction(self, value: float) -> float:
        if not 0.0 < value <= MAX_TEST_FRACTION:
            raise serializers.ValidationError(
                f"Must be greater than 0 and at most {MAX_TEST_FRACTION}."
            )
        return value


class DpoHyperparameters(SupervisedHyperparameters):
    beta = AutoOr(float, 1e-3, 2.0)


class SupervisedMethod(StrictInputSerializer):
    hyperparameters = SupervisedHyperparameters(required=False)


class DpoMethod(StrictInputSerializer):
    hyperparameters = DpoHyperparameters(required=False)


class Method(StrictInputSerializer):
    type = serializers.ChoiceField(METHODS)
    supervised = SupervisedMethod(required=False)
    dpo = DpoMethod(required=False)


class Adapter(StrictInputSerializer):
    type = serializers.ChoiceField(("lora", "full"))
    r = serializers.IntegerField(min_value=1, max_value=256, default=8)
    alpha = serializers.IntegerField(min_value=1, max_value=1024, default=16)
    dropout = serializers.FloatField(min_value=0.0, max_value=0.9, default=0.0)
    target_modules = serializers.ListField(
        child=serializers.RegexField(r"^[A-Za-z0-9_.]{1,64}$"),
        max_length=32,
        default=list,
    )


class CreateJobInput(StrictInputSerializer):
    model = serializers.CharField(max_length=300)
    training_file = serializers.CharField(max_length=64, required=False)
    validation_file = serializers.CharField(max_length=64, required=False, allow_null=True)
    test_file = serializers.CharField(
        max_length=64,
        required=False,
        allow_null=True,
        help_text=(
            "Our extension: a fine-tune file in the training data's format, held out: the "
            "final model is scored on it (test metrics in `test_metrics`), never trained on."
        ),
    )
    dataset = serializers.CharField(max_length=64, required=False)
    suffix = serializers.CharField(max_length=64, required=False, allow_null=True)
    seed = serializers.IntegerField(min_value=0, max_value=2**31 - 1, required=False)
    metadata = serializers.DictField(
        child=serializers.CharField(max_length=METADATA_VALUE_MAX, allow_blank=True),
        required=False,
        allow_null=True,
    )
    method = Method(required=False)
    hyperparameters = DpoHyperparameters(required=False)  # deprecated top-level form
    integrations = serializers.ListField(required=False, max_length=0, allow_null=True)
    adapter = Adapter(required=False, allow_null=True)
    task = serializers.ChoiceField(TASKS, default="causal_lm")
    gpus = serializers.IntegerField(min_value=1, max_value=64, default=1)

    def validate_suffix(self, value: str | None) -> str:
        if value and not SUFFIX_RE.match(value):
            raise serializers.ValidationError(
                "Use 1 to 64 letters, digits, '-' or '_' (it becomes part of the model id)."
            )
        return value or ""

    def validate_metadata(self, value: dict[str, str] | None) -> dict[str, str]:
        return metadata_checked(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("training_file" in attrs) == ("dataset" in attrs):
            raise serializers.ValidationError(
                {"training_file": ["Give either 'training_file' or 'dataset' (a version id)."]}
            )
        return attrs


@dataclass(frozen=True)
class Resolved:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    beta: float | None

    def openai_shape(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
        }
        if self.beta is not None:
            out["beta"] = self.beta
        return out


def requested_hyperparameters(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method type, hyperparameters as asked, "auto" kept)."""
    method = data.get("method") or {"type": "supervised"}
    kind = method["type"]
    nested = (method.get(kind) or {}).get("hyperparameters")
    top = data.get("hyperparameters")
    if nested is not None and top is not None:
        raise ApiError(
            "Give hyperparameters either in 'method' or at the top level, not both.",
            param="hyperparameters",
        )
    chosen = dict(nested or top or {})
    for name in ("n_epochs", "batch_size", "learning_rate_multiplier"):
        chosen.setdefault(name, AUTO)
    if chosen.get("test_fraction") is not None and data.get("test_file"):
        raise ApiError(
            "Give a held-out 'test_file' or 'hyperparameters.test_fraction', not both.",
            param="test_file",
            code="invalid_test_file",
        )
    if kind == "dpo":
        chosen.setdefault("beta", AUTO)
    else:
        chosen.pop("beta", None)
    return kind, chosen


def resolve(requested: dict[str, Any], *, rows: int, adapter: str) -> Resolved:
    """Replace "auto" using the dataset's size (OpenAI's heuristics, documented in the README)."""
    n_epochs = requested["n_epochs"]
    if n_epochs == AUTO:
        n_epochs = auto_epochs(rows)
    if n_epochs > settings.JOBS_MAX_EPOCHS:
        raise ApiError(f"n_epochs may be at most {settings.JOBS_MAX_EPOCHS}.", param="n_epochs")
    batch_size = requested["batch_size"]
    if batch_size == AUTO:
        batch_size = max(1, min(MAX_BATCH_SIZE, round(rows * 0.002)))
    multiplier = requested["learning_rate_multiplier"]
    if multiplier == AUTO:
        multiplier = 1.0
    beta = requested.get("beta")
    if beta == AUTO:
        beta = 0.1
    return Resolved(
        n_epochs=int(n_epochs),
        batch_size=int(batch_size),
        learning_rate_multiplier=float(multiplier),
        learning_rate=BASE_LEARNING_RATE[adapter] * float(multiplier),
        beta=None if beta is None else float(beta),
    )
