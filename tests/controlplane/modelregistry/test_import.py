"""Importing base models: safetensors only, copied into object storage, demo models installed."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from controlplane.modelregistry import services
from controlplane.modelregistry.artifacts import PICKLE_SUFFIXES
from controlplane.modelregistry.models import BaseModel
from tests.support.models import minilm_dir, tiny_model_dir

pytestmark = pytest.mark.django_db


@pytest.fixture
def llama_copy(tmp_path: Path) -> Path:
    """A writable copy of the tiny Llama directory, to spoil."""
    out = tmp_path / "llama"
    shutil.copytree(tiny_model_dir("llama"), out)
    return out


def test_import_command_copies_the_model_into_storage(db: None) -> None:
    source = tiny_model_dir("llama")
    out = StringIO()

    call_command(
        "import_base_model",
        str(source),
        "--name",
        "acme-llama",
        "--price-per-1k",
        "0.0015",
        "--description",
        "Our Llama",
        stdout=out,
    )

    model = BaseModel.objects.get(pk="acme-llama")
    assert model.family == "llama"  # config.json's model_type
    assert (
        model.context_length
        == json.loads((source / "config.json").read_text())["max_position_embeddings"]
    )
    assert model.price_per_1k_training_tokens == Decimal("0.0015")
    assert model.tasks == ["causal_lm", "classification"]
    assert model.methods == ["supervised", "dpo"]
    assert model.adapters == ["lora", "full"]
    assert model.description == "Our Llama"
    stored = Path(settings.MEDIA_ROOT) / "base-models" / "acme-llama"
    assert model.uri == stored.as_uri()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (stored / name).read_bytes() == (source / name).read_bytes()
    assert "Imported acme-llama" in out.getvalue()


def test_gpt2_context_comes_from_n_positions(db: None) -> None:
    source = tiny_model_dir("gpt2")
    model = services.base_model_import(
        path=source, name="g", price_per_1k_training_tokens="0", copy=False
    )
    assert model.family == "gpt2"
    assert model.context_length == json.loads((source / "config.json").read_text())["n_positions"]
    assert model.uri == source.resolve().as_uri()  # referenced in place


def test_in_place_import_copies_nothing(db: None) -> None:
    call_command("import_base_model", str(tiny_model_dir("llama")), "--name", "x", "--in-place")
    assert not (Path(settings.MEDIA_ROOT) / "base-models").exists()
    assert BaseModel.objects.get(pk="x").uri.startswith("file://")


def test_minilm_defaults_to_an_encoders_tasks(db: None) -> None:
    model = services.base_model_import(
        path=minilm_dir(), name="mini", price_per_1k_training_tokens="0.0001", copy=False
    )
    assert (model.family, model.context_length) == ("bert", 512)
    assert model.tasks == ["embeddings", "classification"]
    assert model.methods == ["supervised"]


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickles_are_refused_with_a_hint_to_convert(llama_copy: Path, suffix: str) -> None:
    (llama_copy / "nested").mkdir()
    (llama_copy / "nested" / f"pytorch_model{suffix}").write_bytes(b"\x80\x04pickle")

    with pytest.raises(CommandError, match="safetensors") as caught:
        call_command("import_base_model", str(llama_copy), "--name", "evil")

    assert f"pytorch_model{suffix}" in str(caught.value)
    assert not BaseModel.objects.exists()
    assert not (Path(settings.MEDIA_ROOT) / "base-models").exists()


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("model.safetensors", "no \\*.safetensors"),
        ("config.json", "no config.json"),
        ("tokenizer.json", "no tokenizer.json"),
    ],
)
def test_incomplete_directories_are_refused(llama_copy: Path, remove: str, message: str) -> None:
    (llama_copy / remove).unlink()
    with pytest.raises(ValueError, match=message):
        services.base_model_import(path=llama_copy, name="x", price_per_1k_training_tokens=0)


def test_a_config_without_model_type_or_context_needs_them_given(llama_copy: Path) -> None:
    (llama_copy / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="family"):
        services.base_model_import(path=llama_copy, name="x", price_per_1k_training_tokens=0)
    with pytest.raises(ValueError, match="context length"):
        services.base_model_import(
            path=llama_copy, name="x", family="llama", price_per_1k_training_tokens=0
        )
    model = services.base_model_import(
        path=llama_copy,
        name="x",
        family="llama",
        context_length=128,
        price_per_1k_training_tokens=0,
        copy=False,
    )
    assert model.context_length == 128


@pytest.mark.parametrize("name", ["", "ft:x", "a/b", "has space", "-lead", "x" * 65])
def test_bad_names_are_refused(db: None, name: str) -> None:
    with pytest.raises(ValueError, match="Invalid model name"):
        services.base_model_import(
            path=tiny_model_dir("llama"), name=name, price_per_1k_training_tokens=0
        )


def test_a_name_in_use_is_refused_and_its_files_are_kept(db: None) -> None:
    services.base_model_import(
        path=tiny_model_dir("llama"), name="taken", price_per_1k_training_tokens=0
    )
    with pytest.raises(ValueError, match="already exists"):
        services.base_model_import(
            path=tiny_model_dir("gpt2"), name="taken", price_per_1k_training_tokens=0
        )
    stored = Path(settings.MEDIA_ROOT) / "base-models" / "taken" / "config.json"
    assert json.loads(stored.read_text())["model_type"] == "llama"


@pytest.mark.parametrize("price", ["-1", "0.0000001", "1e9", "NaN"])
def test_bad_prices_are_refused(db: None, price: str) -> None:
    with pytest.raises(ValueError, match="price_per_1k_training_tokens"):
        services.base_model_import(
            path=tiny_model_dir("llama"), name="x", price_per_1k_training_tokens=price, copy=False
        )


def test_install_demo_models_installs_three_models_once(db: None) -> None:
    first = StringIO()
    call_command("install_demo_models", stdout=first)

    models = {m.pk: m for m in BaseModel.objects.all()}
    assert set(models) == {"atelier-tiny-gpt2", "atelier-tiny-llama", "all-MiniLM-L6-v2"}
    assert models["atelier-tiny-gpt2"].family == "gpt2"
    assert models["atelier-tiny-llama"].family == "llama"
    for name in ("atelier-tiny-gpt2", "atelier-tiny-llama"):
        assert models[name].tasks == ["causal_lm", "classification"]
        assert models[name].methods == ["supervised", "dpo"]
        assert models[name].adapters == ["lora", "full"]
    minilm = models["all-MiniLM-L6-v2"]
    assert (minilm.family, minilm.tasks, minilm.methods) == (
        "bert",
        ["embeddings", "classification"],
        ["supervised"],
    )
    stored = Path(settings.MEDIA_ROOT) / "base-models"
    assert (stored / "all-MiniLM-L6-v2" / "model.safetensors").stat().st_size == (
        minilm_dir() / "model.safetensors"
    ).stat().st_size
    assert (stored / "atelier-tiny-llama" / "tokenizer.json").exists()
    assert first.getvalue().count(": installed") == 3

    again = StringIO()
    call_command("install_demo_models", stdout=again)

    assert again.getvalue().count("already installed") == 3
    assert {m.pk: m.created_at for m in BaseModel.objects.all()} == {
        pk: m.created_at for pk, m in models.items()
    }
