"""Queue and task names: the only coupling between the control plane and the workers."""

from __future__ import annotations

from typing import Final

CONTROL: Final = "control"
GPU_TRAINING: Final = "gpu.training"
GPU_COMPRESSION: Final = "gpu.compression"
GPU_INFERENCE: Final = "gpu.inference"

#: Queues a `gpu` worker consumes (`atelier worker gpu`): long jobs, one per process.
#: GPU_INFERENCE has its own workers (`atelier worker inference`, a threads pool
#: around one engine that batches requests), so a training job never blocks serving.
GPU_QUEUES: Final = (GPU_TRAINING, GPU_COMPRESSION)

# Task names. Workers register tasks under these names; the control plane
# sends them with `send_task(name, ...)` and never imports worker code.
GPU_PING: Final = "gpuworkers.ping"
CONTROL_PING: Final = "controlplane.ping"
#: Fine-tuning: one attempt of a job (arg: TrainingSpec.to_json()), on GPU_TRAINING.
TRAIN: Final = "gpuworkers.training.run"
#: Compression: one attempt of a job (arg: CompressionSpec.to_json()), on GPU_COMPRESSION.
COMPRESS: Final = "gpuworkers.compression.run"
#: Evaluation: one attempt of scoring models on a file (arg: EvaluationSpec.to_json()),
#: on GPU_TRAINING (the `gpu` workers' long-job queue).
EVALUATE: Final = "gpuworkers.evaluation.run"
#: A worker's report about a job attempt (arg: Report.to_json()), on CONTROL.
CONTROL_JOB_REPORT: Final = "controlplane.jobs.report"
#: Inference: one request (arg: InferenceRequest.to_json()), on GPU_INFERENCE.
INFER: Final = "gpuworkers.inference.run"
#: Tokens used by one inference request (arg: UsageReport.to_json()), on CONTROL.
CONTROL_USAGE_REPORT: Final = "controlplane.inference.usage"
