"""Compression jobs on a GPU worker: quantize, prune, distill, and the before/after report.

`task.py` is the Celery task (`gpuworkers.compression.run`); `runner.py` runs one attempt
(load, compress, measure, upload, report); `quantize.py`, `prune.py` and `distill.py` are
the methods, each a function of a `context.Work`; `quantized.py` writes and loads the
quantized artifact format (used by the inference workers too); `measure.py` the report.
"""
