from __future__ import annotations

import os

# The tiny test models gain nothing from a second thread, and on a small shared
# machine (other test runs, worker subprocesses) OpenMP threads that spin waiting
# for a busy core make a 10 ms step take 300 ms. Workers started by these tests
# inherit it. The engine reads TORCH_NUM_THREADS on each attempt.
os.environ.setdefault("TORCH_NUM_THREADS", "1")
