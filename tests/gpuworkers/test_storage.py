"""Storage by URI, on the local filesystem and on S3 (moto in server mode), and a whole
training attempt whose model, data, signal and outputs all live on S3."""

from __future__ import annotations

import dataclasses
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from gpuworkers import storage
from gpuworkers.training.engine import run_training
from jobcontracts.training import Signal
from tests.gpuworkers.helpers import Reports, assert_well_formed, make_spec

BUCKET = "atelier-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("GPU_WORKER_CACHE_DIR", str(tmp_path / "worker-cache"))
    monkeypatch.setenv("AWS_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    buckets = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    if BUCKET not in buckets:
        client.create_bucket(Bucket=BUCKET)
    return moto_endpoint


@pytest.fixture(params=["file", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh "directory" URI on each backend."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{tmp_path.name}"


def test_small_objects_round_trip_and_missing_ones_read_as_none(root: str) -> None:
    uri = storage.join(root, "control", "signal.json")
    assert storage.read_bytes(uri) is None

    storage.write_bytes(uri, Signal(2, "pause").to_bytes())
    storage.write_bytes(uri, Signal(2, "cancel").to_bytes())  # overwrite

    assert Signal.from_bytes(storage.read_bytes(uri) or b"") == Signal(2, "cancel")
    with pytest.raises(FileNotFoundError):
        storage.open_read(storage.join(root, "nope")).__enter__()


def test_streaming_read_and_download_of_a_large_object(root: str, tmp_path: Path) -> None:
    data = b"".join(b"%08d line of training data\n" % i for i in range(200_000))  # ~6 MB
    uri = storage.join(root, "files", "train.jsonl")
    source = tmp_path / "source.jsonl"
    source.write_bytes(data)
    storage.upload_file(source, uri)

    with storage.open_read(uri) as stream:
        first = stream.read(1024)
        rest = io.BytesIO()
        while chunk := stream.read(1 << 16):
            rest.write(chunk)
    assert first + rest.getvalue() == data

    local = storage.download_file(uri, tmp_path / "copy" / "train.jsonl")
    assert local.read_bytes() == data


def test_directories_upload_and_download_with_nested_names(root: str, tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"\0" * 1000)
    (source / "sub" / "tokenizer.json").write_text('{"x": 1}')
    target = storage.join(root, "artifacts", "final")

    names = storage.upload_dir(source, target, last=("config.json",))

    assert names == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert storage.list_names(target) == names
    # A prefix is not a directory of a longer name's sibling ("final" vs "final-2").
    storage.write_bytes(storage.join(root, "artifacts", "final-2", "x.json"), b"{}")
    assert storage.list_names(target) == names
    copy = tmp_path / "copy"
    assert storage.download_dir(target, copy) == names
    assert (copy / "sub" / "tokenizer.json").read_text() == '{"x": 1}'
    assert (copy / "model.safetensors").stat().st_size == 1000
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(root, "missing"), tmp_path / "none")


def test_uris_are_checked() -> None:
    assert storage.parse("s3://bucket/a/b%20c") == storage.Location("s3", "bucket", "a/b c")
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    assert storage.local_path("s3://bucket/x") is None
    assert storage.join("s3://b/out/", "/final", "x.json") == "s3://b/out/final/x.json"
    for bad in ("http://example.com/x", "file://host/x", "file:relative", "s3:///key"):
        with pytest.raises(storage.StorageError):
            storage.parse(bad)


def test_a_training_attempt_entirely_on_s3(s3_env: str, tmp_path: Path) -> None:
    local = make_spec(tmp_path, checkpoint_every_steps=1, n_epochs=1)
    prefix = f"s3://{BUCKET}/{tmp_path.name}"
    model_dir = Path(local.base_model.uri.removeprefix("file://"))
    storage.upload_dir(model_dir, f"{prefix}/models/tiny-llama")
    train = Path(local.training_data.uri.removeprefix("file://"))
    storage.upload_file(train, f"{prefix}/files/train.jsonl")
    spec = dataclasses.replace(
        local,
        base_model=dataclasses.replace(local.base_model, uri=f"{prefix}/models/tiny-llama"),
        training_data=dataclasses.replace(local.training_data, uri=f"{prefix}/files/train.jsonl"),
        output_uri=f"{prefix}/jobs/ft-1",
        control_uri=f"{prefix}/jobs/ft-1/control.json",
    )
    storage.write_bytes(spec.control_uri, Signal(1, "run").to_bytes())
    reports = Reports()

    outcome = run_training(spec, reports, signal_reader=None)

    assert outcome.status == "succeeded", reports.of("failed")
    assert_well_formed(reports, final="succeeded")
    assert outcome.artifact_uri == f"{prefix}/jobs/ft-1/final"
    assert "adapter_model.safetensors" in storage.list_names(outcome.artifact_uri)
    cached = list((tmp_path / "worker-cache" / "models").iterdir())
    assert len(cached) == 1
    assert (cached[0] / "config.json").exists()
    checkpoints = storage.list_names(f"{prefix}/jobs/ft-1/checkpoints")
    assert "step-00000001/trainer_state.json" in checkpoints
    # Resuming from an S3 checkpoint (downloaded, then removed locally).
    resumed = dataclasses.replace(
        spec,
        attempt=2,
        resume_from=f"{prefix}/jobs/ft-1/checkpoints/step-00000001",
        output_uri=f"{prefix}/jobs/ft-1b",
    )
    again = Reports()
    second = run_training(resumed, again, signal_reader=lambda: None)
    assert second.status == "succeeded", again.of("failed")
    assert second.trained_tokens == outcome.trained_tokens
    assert again.one("started").data["resumed_from_step"] == 1
    assert list((tmp_path / "worker-cache" / "downloads").iterdir()) == []
