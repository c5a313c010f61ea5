"""Training and inference refuse pickle weights with one shared check (gpuworkers.safeload)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpuworkers.inference import models
from gpuworkers.training.engine import run_training
from jobcontracts.training import FAILED, BaseModelRef
from tests.gpuworkers.helpers import Reports, make_spec
from tests.support.models import tiny_model_dir


def pickled_model_dir(tmp: Path, *, keep_safetensors: bool = False) -> Path:
    """The tiny GPT-2 with its weights in `pytorch_model.bin` (a torch.save pickle), as
    `save_pretrained(safe_serialization=False)` wrote them before transformers 5."""
    out = tmp / "pickled-gpt2"
    shutil.copytree(tiny_model_dir("gpt2"), out)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    if not keep_safetensors:
        (out / "model.safetensors").unlink()
    return out


def test_training_refuses_a_base_model_that_only_has_pytorch_model_bin(tmp_path: Path) -> None:
    folder = pickled_model_dir(tmp_path)
    assert sorted(p.name for p in folder.glob("*.bin")) == ["pytorch_model.bin"]
    assert not list(folder.glob("*.safetensors"))
    spec = make_spec(
        tmp_path,
        family="gpt2",
        adapter=None,
        base_model=BaseModelRef("pickled-gpt2", folder.as_uri(), "gpt2", 256),
    )
    reports = Reports()

    outcome = run_training(spec, reports, signal_reader=lambda: None)

    assert (outcome.status, outcome.error_code) == ("failed", "unsafe_weights")
    failed = reports.one(FAILED)
    assert failed.data["code"] == "unsafe_weights"
    assert failed.data["retryable"] is False
    assert "pytorch_model.bin" in failed.data["message"]
    assert "safetensors" in failed.data["message"]
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_inference_refuses_a_model_with_pickle_weights_beside_safetensors(tmp_path: Path) -> None:
    folder = pickled_model_dir(tmp_path, keep_safetensors=True)
    key = models.ModelKey(kind=models.CAUSAL, uri=folder.as_uri())

    with pytest.raises(models.ModelError) as refused:
        models.load(key, folder, device=torch.device("cpu"), dtype=torch.float32)

    assert (refused.value.status, refused.value.code) == (503, "model_unavailable")
    assert "pytorch_model.bin" in refused.value.message


def test_training_loads_the_same_model_saved_as_safetensors(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, family="gpt2", adapter=None, n_epochs=1)
    assert run_training(spec, Reports(), signal_reader=lambda: None).status == "succeeded"
