"""Serving models: the Celery task `gpuworkers.inference.run` and the engine behind it.

`task` (imports without torch) receives requests; `scheduler.Engine` owns the
loaded models (`models`), batches generation (`decode`, `sampling`, `text`) and
encoding (`encode`), and replies through `gpuworkers.replies`. `bare` calls the
same models without the platform, for benchmarks.
"""
