"""The inference wire contract reads payloads of other versions: a field added by a newer
gateway or worker is ignored by an older reader, a field it lacks takes its default."""

from __future__ import annotations

import dataclasses

from jobcontracts.inference import InferenceRequest, ModelRef, Params, UsageReport


def request() -> InferenceRequest:
    return InferenceRequest(
        request_id="cmpl-1",
        organization_id="org-1",
        api_key_id=None,
        kind="completion",
        model=ModelRef(
            id="m",
            base_name="m",
            base_uri="file:///m",
            family="llama",
            task="causal_lm",
            context_length=256,
        ),
        params=Params(max_tokens=4),
        inputs=("hello",),
        trace_id="req_abc",
    )


def test_fields_a_newer_sender_added_are_ignored() -> None:
    payload = request().to_json()
    payload["priority_hint"] = "later"
    payload["model"]["quantization"] = "fp4"
    payload["params"]["min_p"] = 0.1
    assert InferenceRequest.from_json(payload) == request()
    usage = UsageReport("cmpl-1", "org-1", None, "m", "completion", 1, 2, "completed", 3.0, 4.0)
    wire = {**usage.to_json(), "cached_tokens": 7}
    assert UsageReport.from_json(wire) == usage


def test_fields_an_older_sender_lacks_take_their_defaults() -> None:
    payload = request().to_json()
    del payload["trace_id"]
    assert InferenceRequest.from_json(payload) == dataclasses.replace(request(), trace_id="")
