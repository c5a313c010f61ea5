"""A usage report as an inference worker sends it, with defaults for what a test ignores."""

from __future__ import annotations

import time
from typing import Any

from jobcontracts.inference import UsageReport


def usage_report(**fields: Any) -> UsageReport:
    values: dict[str, Any] = {
        "request_id": "chatcmpl-1",
        "organization_id": "org-test",
        "api_key_id": None,
        "model": "atelier-tiny-llama",
        "kind": "chat",
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "status": "completed",
        "latency_ms": 4.0,
        "at": time.time(),
        **fields,
    }
    return UsageReport(**values)
