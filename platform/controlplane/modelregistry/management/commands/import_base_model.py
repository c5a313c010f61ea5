"""`atelier manage import_base_model PATH --name NAME`: add a base model from a local directory."""

from __future__ import annotations

from argparse import ArgumentParser, ArgumentTypeError
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from controlplane.modelregistry import services
from controlplane.modelregistry.artifacts import PICKLE_SUFFIXES


def _decimal(value: str) -> Decimal:
    try:
        return Decimal(value)
    except InvalidOperation:
        raise ArgumentTypeError(f"not a number: {value!r}") from None


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Command(BaseCommand):
    help = (
        "Import a Hugging Face-format model directory (config.json, *.safetensors, "
        "tokenizer.json) as a base model. Pickle files (" + ", ".join(PICKLE_SUFFIXES) + ") "
        "are refused: convert them to safetensors first."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("path", type=Path, help="The model directory.")
        parser.add_argument("--name", required=True, help="Public model id, e.g. acme-llama-8b.")
        parser.add_argument("--family", help="Default: config.json's model_type.")
        parser.add_argument(
            "--price-per-1k",
            type=_decimal,
            default=Decimal("0"),
            help="Price per 1,000 training tokens (default 0).",
        )
        parser.add_argument(
            "--context-length",
            type=int,
            help="Default: config.json's max_position_embeddings or n_positions.",
        )
        parser.add_argument("--description", default="")
        parser.add_argument("--tasks", type=_names, help="Comma-separated; default by family.")
        parser.add_argument("--methods", type=_names, help="Comma-separated; default by family.")
        parser.add_argument("--adapters", type=_names, help="Comma-separated; default lora,full.")
        parser.add_argument(
            "--in-place",
            action="store_true",
            help="Reference the directory where it is (file://) instead of copying it into "
            "object storage; every worker must then see the same path.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            model = services.base_model_import(
                path=options["path"],
                name=options["name"],
                family=options["family"],
                price_per_1k_training_tokens=options["price_per_1k"],
                context_length=options["context_length"],
                description=options["description"],
                copy=not options["in_place"],
                tasks=options["tasks"],
                methods=options["methods"],
                adapters=options["adapters"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Imported {model.pk} ({model.family}, context {model.context_length}, "
            f"{model.price_per_1k_training_tokens} per 1k training tokens) from {model.uri}"
        )
