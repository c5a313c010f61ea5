from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest

from controlplane.modelregistry import services
from controlplane.modelregistry.models import BaseModel
from tests.support.models import tiny_model_dir
from tests.support.people import Person
from tests.support.sdk import in_process_sdk


@pytest.fixture
def sdk(alice: Person) -> Iterator[openai.OpenAI]:
    with in_process_sdk(alice.key) as client:
        yield client


@pytest.fixture
def tiny_llama(db: None) -> BaseModel:
    """The real tiny Llama model, copied into (test) object storage."""
    return services.base_model_import(
        path=tiny_model_dir("llama"),
        name="atelier-tiny-llama",
        price_per_1k_training_tokens=Decimal("0.000800"),
    )
