"""The model registry on S3 (django-storages), served by moto in server mode."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import override_settings
from tokenizers import Tokenizer

from controlplane.datasets.storage import object_uri
from controlplane.modelregistry import artifacts, services, tokens
from controlplane.modelregistry.models import BaseModel
from tests.controlplane.datasets.test_s3 import BUCKET, moto_url, s3  # noqa: F401 - fixtures
from tests.support.models import tiny_model_dir
from tests.support.people import Person
from tests.support.registry import customer_model

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def keys(client: Any, bucket: str = BUCKET, prefix: str = "") -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(item["Key"] for item in listed)


def test_a_base_model_is_copied_into_the_bucket_and_its_tokenizer_read_from_there(
    s3: Any,  # noqa: F811
) -> None:
    source = tiny_model_dir("llama")
    tokens._tokenizer_at.cache_clear()

    model = services.base_model_import(path=source, name="s3-llama", price_per_1k_training_tokens=1)

    assert model.uri == f"s3://{BUCKET}/base-models/s3-llama"
    stored = keys(s3, prefix="base-models/s3-llama/")
    assert "base-models/s3-llama/model.safetensors" in stored
    assert "base-models/s3-llama/tokenizer.json" in stored
    name = default_storage.save("files/x/data.txt", ContentFile(b"hello there\nthe cat sat\n"))
    reference = Tokenizer.from_file(str(source / "tokenizer.json"))

    stats = tokens.count_dataset_tokens(base=model, storage_name=name, format="text")

    assert stats.total_tokens == sum(
        len(reference.encode(t).ids) for t in ("hello there", "the cat sat")
    )


def test_deleting_a_model_deletes_its_objects_in_the_bucket_only(
    s3: Any,  # noqa: F811
    alice: Person,
    django_capture_on_commit_callbacks: Any,
) -> None:
    for name in ("final/adapter.safetensors", "final/sub/config.json", "checkpoints/a.json"):
        default_storage.save(f"fine-tuning/ftjob-1/{name}", ContentFile(b"x"))
    model = customer_model(alice, uri=object_uri("fine-tuning/ftjob-1/final"))
    assert model.uri == f"s3://{BUCKET}/fine-tuning/ftjob-1/final"

    with django_capture_on_commit_callbacks(execute=True):
        services.customer_model_delete(organization=alice.organization, model=model)

    assert keys(s3) == ["fine-tuning/ftjob-1/checkpoints/a.json"]


def test_a_model_in_another_bucket_is_read_with_boto3_and_never_deleted(
    s3: Any,  # noqa: F811
    moto_url: str,  # noqa: F811
    alice: Person,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s3.create_bucket(Bucket="elsewhere")
    tokenizer_json = (tiny_model_dir("llama") / "tokenizer.json").read_bytes()
    s3.put_object(Bucket="elsewhere", Key="llama/tokenizer.json", Body=tokenizer_json)
    base = BaseModel.objects.create(
        id="elsewhere-llama",
        family="llama",
        context_length=256,
        uri="s3://elsewhere/llama",
        price_per_1k_training_tokens=1,
    )
    assert artifacts.storage_name_for_uri(base.uri) is None
    tokens._tokenizer_at.cache_clear()

    with override_settings(AWS_S3_ENDPOINT_URL=moto_url, AWS_S3_REGION_NAME="us-east-1"):
        assert tokens.tokenizer_for(base).token_to_id("<|im_start|>") is not None

    model = customer_model(alice, base=base, uri="s3://elsewhere/llama")
    with django_capture_on_commit_callbacks(execute=True):
        services.customer_model_delete(organization=alice.organization, model=model)
    assert keys(s3, "elsewhere") == ["llama/tokenizer.json"]
    s3.delete_object(Bucket="elsewhere", Key="llama/tokenizer.json")
    s3.delete_bucket(Bucket="elsewhere")
