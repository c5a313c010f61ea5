"""The fine-tuning engine: one attempt of a job, from a `TrainingSpec` to reports.

    from gpuworkers.training.engine import run_training   # in-process, one device
    from gpuworkers.training.task import execute           # what the Celery task runs

This package's `__init__` imports nothing heavy: the Celery task module must
import without torch (models and torch load inside the task).
"""
