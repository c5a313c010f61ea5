"""Specs, datasets and report checks shared by the training engine's tests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobcontracts.training import (
    FINAL_KINDS,
    BaseModelRef,
    DataRef,
    Hyperparameters,
    LoraConfig,
    Report,
    Signal,
    TrainingSpec,
)
from tests.support.models import minilm_dir, tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]
#: Named, never reached: importing the GPU workers' app and routing a task connect to nothing.
UNREACHED_REDIS = "redis://127.0.0.1:9/0"


def run_bare_worker_python(
    code: str, data_dir: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -c code` as a GPU host runs it: only workers/ on the path (no Django, no
    control plane), nothing in the environment but PATH, the data directory and `env`."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT / "workers"),
            "ATELIER_DATA_DIR": str(data_dir),
            **env,
        },
    )


CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "where is my order"},
            {"role": "assistant", "content": "your order has shipped it will arrive on monday"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "please help"},
            {"role": "user", "content": "the invoice"},
            {"role": "assistant", "content": "the invoice is attached thank you"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello how can i help today"},
            {"role": "user", "content": "refunds"},
            {
                "role": "assistant",
                "content": "we are sorry for the delay our team will call you back",
            },
        ]
    },
]
PROMPT_COMPLETION_ROWS = [
    {"prompt": "the weather is", "completion": " sunny the cat sat on the mat"},
    {"prompt": "one two three", "completion": " four five six seven eight nine ten"},
    {"prompt": "your order", "completion": " has shipped it will arrive on monday"},
]
TEXT_LINES = [
    "the model learns from data and the customer owns the result",
    "the cat sat on the mat one two three four five",
    "our team will call you back the weather is sunny",
]
CLASSIFICATION_ROWS = [
    {"text": "this is great thank you", "label": "positive"},
    {"text": "great service good result", "label": "positive"},
    {"text": "good fine great", "label": "positive"},
    {"text": "thank you this is good", "label": "positive"},
    {"text": "this is terrible", "label": "negative"},
    {"text": "bad terrible delay errors", "label": "negative"},
    {"text": "terrible bad bad", "label": "negative"},
    {"text": "sorry for the terrible errors", "label": "negative"},
]
PREFERENCE_ROWS = [
    {"prompt": "where is my order", "chosen": " it has shipped", "rejected": " bad terrible"},
    {"prompt": "the invoice", "chosen": " is attached", "rejected": " errors errors"},
    {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": "how can i help today",
        "rejected": "terrible",
    },
    {"prompt": "thank you", "chosen": " you are welcome", "rejected": " no"},
]

#: What a model artifact or checkpoint may hold: weights, configs, tokenizer files.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt")


def write_jsonl(path: Path, rows: Iterable[Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return f"file://{path}"


def write_text(path: Path, lines: Iterable[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return f"file://{path}"


def base_model(family: str) -> BaseModelRef:
    if family == "bert":
        return BaseModelRef("all-minilm-l6-v2", f"file://{minilm_dir()}", "bert", 512)
    return BaseModelRef(f"tiny-{family}", f"file://{tiny_model_dir(family)}", family, 256)


def make_spec(
    tmp: Path,
    *,
    rows: Iterable[Any] = CHAT_ROWS,
    fmt: str = "chat",
    family: str = "llama",
    task: str = "causal_lm",
    method: str = "supervised",
    adapter: LoraConfig | None = LoraConfig(),  # noqa: B008 - frozen, shared safely
    valid_rows: Iterable[Any] | None = None,
    repeat: int = 1,
    n_epochs: int = 2,
    batch_size: int = 2,
    learning_rate: float = 1e-2,
    max_seq_len: int = 64,
    seed: int = 7,
    **overrides: Any,
) -> TrainingSpec:
    rows = list(rows) * repeat
    writer = write_text if fmt == "text" else write_jsonl
    train_uri = writer(tmp / "data" / "train.jsonl", rows)
    validation = None
    if valid_rows is not None:
        validation = DataRef(writer(tmp / "data" / "valid.jsonl", list(valid_rows)), fmt)
    fields: dict[str, Any] = {
        "job_id": "ftjob-test",
        "attempt": 1,
        "organization_id": "org-test",
        "task": task,
        "method": method,
        "base_model": base_model(family),
        "training_data": DataRef(train_uri, fmt),
        "validation_data": validation,
        "hyperparameters": Hyperparameters(
            n_epochs=n_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            max_seq_len=max_seq_len,
            seed=seed,
        ),
        "output_uri": f"file://{tmp}/out",
        "control_uri": f"file://{tmp}/control/signal.json",
        "adapter": adapter,
        "checkpoint_every_steps": 0,
        "heartbeat_seconds": 30.0,
        "control_poll_seconds": 0.0,
    }
    fields.update(overrides)
    spec = TrainingSpec(**fields)
    spec.check()
    return spec


class Reports:
    """A reporter that keeps what it is sent (thread-safe: heartbeats come from a thread)."""

    def __init__(self) -> None:
        self.items: list[Report] = []
        self._lock = threading.Lock()

    def __call__(self, report: Report) -> None:
        # Round-trip through the wire format, as the control plane will see it.
        wire = json.loads(json.dumps(report.to_json()))
        with self._lock:
            self.items.append(Report.from_json(wire))

    def kinds(self) -> list[str]:
        return [r.kind for r in self.items]

    def of(self, kind: str) -> list[Report]:
        return [r for r in self.items if r.kind == kind]

    def one(self, kind: str) -> Report:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind}, got {self.kinds()}"
        return found[0]


def assert_well_formed(reports: Reports, *, final: str | None) -> None:
    """Numbered 0, 1, 2, … for one attempt; exactly one final report, last (or none)."""
    items = reports.items
    assert [r.seq for r in items] == list(range(len(items)))
    assert len({(r.job_id, r.attempt) for r in items}) <= 1
    finals = [r.kind for r in items if r.kind in FINAL_KINDS]
    if final is None:
        assert finals == []
    else:
        assert finals == [final], reports.kinds()
        assert items[-1].kind == final


def assert_no_pickle(root: Path) -> list[str]:
    """Every file under `root` is safetensors, JSON or tokenizer text: nothing unpicklable."""
    names = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        names.append(path.relative_to(root).as_posix())
        assert path.suffix in ALLOWED_SUFFIXES, f"unexpected file {path}"
        head = path.read_bytes()[:2]
        assert head != b"PK", f"{path} is a zip (torch.save) archive"
        assert not head.startswith(b"\x80"), f"{path} is a pickle"
    return names


class ScriptedSignals:
    """A signal reader that answers `Signal`s from a script: the n-th read gets `script[n]`
    (None = no signal written), and the last entry from then on."""

    def __init__(self, *script: Signal | None) -> None:
        self.script = list(script) or [None]
        self.reads = 0

    def __call__(self) -> Signal | None:
        answer = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        return answer


def final_dir(spec: TrainingSpec) -> Path:
    return Path(spec.output_uri.removeprefix("file://")) / "final"
