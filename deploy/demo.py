"""`make demo`: a customer's journey through the public API, with the official `openai` SDK.

Run it against a running `make run`. Each step prints a number, a title and what came
back; the script stops and exits 1 at the first step that fails unexpectedly.

To extend the demo, write a function taking a `Demo` and decorate it with
`@step("Title")`: steps run in the order they are defined, and keep what later steps
need (keys, ids) on the `Demo`.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

JSON = dict[str, Any]


class DemoFailure(Exception):
    """A step got something other than what the product promises."""


@dataclass
class Demo:
    base_url: str
    email: str = ""
    key: str = ""  # the owner's first key: all scopes
    client: openai.OpenAI | None = None
    keys: dict[str, JSON] = field(default_factory=dict)  # name -> key object (with `value`)

    @property
    def sdk(self) -> openai.OpenAI:
        if self.client is None:
            raise DemoFailure("no client yet: the sign-up step must run first")
        return self.client

    def as_key(self, value: str) -> openai.OpenAI:
        """The same client, authenticating with another key."""
        return self.sdk.with_options(api_key=value)


Step = Callable[[Demo], None]
STEPS: list[tuple[str, Step]] = []


def step(title: str) -> Callable[[Step], Step]:
    def register(fn: Step) -> Step:
        STEPS.append((title, fn))
        return fn

    return register


def say(*lines: str) -> None:
    for line in lines:
        print(f"    {line}")


def get(client: openai.OpenAI, path: str, **params: Any) -> JSON:
    return client.get(path, cast_to=JSON, options={"params": params} if params else {})


def post(client: openai.OpenAI, path: str, body: JSON) -> JSON:
    return client.post(path, cast_to=JSON, body=body)


def expect(error: type[openai.APIStatusError], call: Callable[[], object]) -> str:
    """Run a call that must fail with `error`; return the error as the user would read it."""
    try:
        call()
    except error as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"{type(exc).__name__} ({exc.status_code} {exc.code}): {body.get('message')}"
    raise DemoFailure(f"expected openai.{error.__name__}, but the call succeeded")


def redacted(key: JSON) -> str:
    return str(key["redacted_value"])


def create_key(demo: Demo, name: str, scopes: list[str]) -> JSON:
    key = post(demo.sdk, "/organization/api_keys", {"name": name, "scopes": scopes})
    demo.keys[name] = key
    return key


# --- the journey -----------------------------------------------------------------------


@step("Sign up (plain HTTP: signing up is not an OpenAI endpoint)")
def sign_up(demo: Demo) -> None:
    demo.email = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}@example.com"
    response = httpx.post(
        f"{demo.base_url}/v1/signup",
        json={
            "email": demo.email,
            "password": "demo-" + secrets.token_urlsafe(24),
            "organization_name": "Demo Robotics",
        },
        timeout=30,
    )
    if response.status_code != 201:
        raise DemoFailure(f"sign-up answered {response.status_code}: {response.text[:300]}")
    data = response.json()
    demo.key = data["api_key"]["value"]
    demo.client = openai.OpenAI(api_key=demo.key, base_url=f"{demo.base_url}/v1")
    say(
        f"user {data['user']['email']} owns {data['organization']['name']} "
        f"({data['organization']['id']}) as {data['role']}",
        f"first API key, shown this once: {demo.key}",
        f"  (from now on only its redacted form: {redacted(data['api_key'])})",
    )


@step("Who am I (GET /v1/me with the SDK)")
def who_am_i(demo: Demo) -> None:
    me = get(demo.sdk, "/me")
    say(
        f"{me['user']['email']}, {me['role']} of {me['organization']['name']}",
        f"key {me['api_key_id']} has {len(me['scopes'])} scopes: {', '.join(me['scopes'])}",
    )


@step("Rename the organization")
def rename_organization(demo: Demo) -> None:
    org = demo.sdk.patch("/organization", cast_to=JSON, body={"name": "Demo Robotics Inc."})
    say(f"{org['id']} is now {org['name']!r} (kinds: {', '.join(org['kinds'])})")


@step("A read_only key can read, but cannot create keys")
def read_only_key(demo: Demo) -> None:
    key = create_key(demo, "dashboard (read only)", ["read_only"])
    say(f"created {key['id']} {redacted(key)} with scopes {key['scopes']}")
    reader = demo.as_key(key["value"])
    listed = get(reader, "/organization/api_keys")
    say(f"it lists the organization's {len(listed['data'])} keys")
    refused = expect(
        openai.PermissionDeniedError,
        lambda: post(reader, "/organization/api_keys", {"name": "sneaky", "scopes": ["all"]}),
    )
    say(f"creating a key with it: {refused}")


@step("An inference-only key, for the application")
def inference_key(demo: Demo) -> None:
    key = create_key(demo, "production app", ["inference"])
    me = get(demo.as_key(key["value"]), "/me")
    say(f"created {key['id']} {redacted(key)}; its effective scopes: {me['scopes']}")


@step("Rotate the application's key with a 60 s grace period")
def rotate_key(demo: Demo) -> None:
    old = demo.keys["production app"]
    new = post(demo.sdk, f"/organization/api_keys/{old['id']}/rotate", {"grace_period_seconds": 60})
    demo.keys["production app"] = new
    for label, key in (("old", old), ("new", new)):
        me = get(demo.as_key(key["value"]), "/me")
        say(f"{label} key {redacted(key)} still works: /v1/me answers as {me['api_key_id']}")
    old_now = get(demo.sdk, f"/organization/api_keys/{old['id']}")
    expires = time.strftime("%H:%M:%S", time.localtime(old_now["expires_at"]))
    say(f"old key {old_now['id']} now expires at {expires} (rotated to {old_now['rotated_to']})")


@step("Revoke the read_only key")
def revoke_key(demo: Demo) -> None:
    key = demo.keys["dashboard (read only)"]
    deleted = demo.sdk.delete(f"/organization/api_keys/{key['id']}", cast_to=JSON)
    say(f"deleted: {deleted['deleted']} ({deleted['id']})")
    refused = expect(openai.AuthenticationError, lambda: get(demo.as_key(key["value"]), "/me"))
    say(f"using it now: {refused}")


@step("The organization's API keys")
def list_keys(demo: Demo) -> None:
    for key in get(demo.sdk, "/organization/api_keys")["data"]:
        say(f"{key['status']:<8} {key['name']:<24} {redacted(key):<28} {','.join(key['scopes'])}")


@step("Invite a teammate as a developer")
def invite_teammate(demo: Demo) -> None:
    email = demo.email.replace("demo-", "teammate-", 1)
    invite = post(demo.sdk, "/organization/members", {"email": email, "role": "developer"})
    expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(invite["expires_at"]))
    say(f"invited {invite['email']} as {invite['role']}: {invite['status']} until {expires}")
    say("(the token goes only to their inbox; they accept with POST /v1/invitations/accept)")


@step("Members and pending invitations")
def list_members(demo: Demo) -> None:
    for member in get(demo.sdk, "/organization/members")["data"]:
        say(f"member   {member['email']:<48} {member['role']}")
    for invite in get(demo.sdk, "/organization/invites")["data"]:
        say(f"invited  {invite['email']:<48} {invite['role']} ({invite['status']})")


@step("The audit log: who changed access, and when")
def audit_log(demo: Demo) -> None:
    entries = get(demo.sdk, "/organization/audit_logs", limit=20)["data"]
    for entry in reversed(entries):  # oldest first reads like a story
        when = time.strftime("%H:%M:%S", time.localtime(entry["effective_at"]))
        actor = entry["actor"]["email"] or entry["actor"]["api_key_id"] or entry["actor"]["type"]
        say(f"{when} {entry['type']:<22} by {actor:<48} on {entry['target']['id']}")


@step("A garbage key is refused")
def garbage_key(demo: Demo) -> None:
    refused = expect(openai.AuthenticationError, lambda: get(demo.as_key("sk-garbage"), "/me"))
    say(refused)


# --- running it --------------------------------------------------------------------------


TRAINING_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are Acme's support bot."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }
    for question, answer in [
        ("How do I reset my password?", "Use 'Forgot password' on the sign-in page."),
        ("Where is my invoice?", "Invoices are under Settings, then Billing."),
        ("Can I export my data?", "Yes: Settings, then Export, sends you a download link."),
        ("Email me at pat@example.com", "I have noted your address."),
    ]
]


def wait_for_file(demo: Demo, file_id: str) -> Any:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        file = demo.sdk.files.retrieve(file_id)
        if file.status in ("processed", "error"):
            return file
        time.sleep(0.5)
    raise DemoFailure(f"file {file_id} was not validated within 60 s (is the control worker up?)")


@step("Upload training data with the SDK (client.files.create), validated on arrival")
def upload_training_file(demo: Demo) -> None:

    rows = [*TRAINING_ROWS, TRAINING_ROWS[0]]  # one exact duplicate, for the cleaning step
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    created = demo.sdk.files.create(file=("support.jsonl", content), purpose="fine-tune")
    say(f"{created.id}: {created.bytes} bytes, status {created.status}")
    file = wait_for_file(demo, created.id)
    report = (file.model_extra or {}).get("validation") or {}
    say(
        f"status {file.status}: format {report.get('format')}, {report.get('rows')} rows, "
        f"{report.get('error_count')} errors"
    )
    if file.status != "processed":
        raise DemoFailure(f"validation failed: {file.status_details}")
    demo.keys["training_file"] = {"id": created.id}


@step("A broken file is reported line by line, before any job exists")
def upload_broken_file(demo: Demo) -> None:
    content = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "oops"}\n[1]\n'
    created = demo.sdk.files.create(file=("broken.jsonl", content), purpose="fine-tune")
    file = wait_for_file(demo, created.id)
    report = (file.model_extra or {}).get("validation") or {}
    say(f"status {file.status}: {file.status_details}")
    for error in report.get("errors", [])[:3]:
        say(f"  line {error['line']}: {error.get('field') or '-'}: {error['reason']}")


@step("A dataset version: cleaned, de-duplicated, PII scrubbed, content-hashed")
def dataset_version(demo: Demo) -> None:
    dataset = post(demo.sdk, "/datasets", {"name": "support chats"})
    version = post(
        demo.sdk,
        f"/datasets/{dataset['id']}/versions",
        {
            "file_ids": [demo.keys["training_file"]["id"]],
            "recipe": {"dedupe_exact": True, "dedupe_near": True, "scrub_pii": True},
        },
    )
    deadline = time.monotonic() + 60
    while version["status"] == "processing" and time.monotonic() < deadline:
        time.sleep(0.5)
        version = get(demo.sdk, f"/datasets/{dataset['id']}/versions/{version['id']}")
    if version["status"] != "ready":
        raise DemoFailure(f"version {version['id']} is {version['status']}")
    report = version["report"]
    removed = {k: v for k, v in report["removed"].items() if v}
    found = {k: v for k, v in report["pii_found"].items() if v}
    say(
        f"{version['id']} v{version['number']}: {report['rows_in']} rows in, "
        f"{version['rows']} out; removed {removed or 'nothing'}; PII replaced {found or 'none'}"
    )
    say(f"sha256 {version['sha256'][:16]}…")


@step("Models: the base models every organization may fine-tune (client.models.list)")
def list_models(demo: Demo) -> None:
    for model in demo.sdk.models.list():
        extra = model.model_extra or {}
        say(
            f"{model.id:<24} {extra.get('family', ''):<6} context {extra.get('context_length')}, "
            f"${extra.get('price_per_1k_training_tokens')} per 1k training tokens"
        )
        demo.keys.setdefault("models", {})[model.id] = extra


@step("Fine-tune the tiny Llama on the uploaded file (client.fine_tuning.jobs.create)")
def fine_tune(demo: Demo) -> None:
    job = demo.sdk.fine_tuning.jobs.create(
        model="atelier-tiny-llama",
        training_file=demo.keys["training_file"]["id"],
        suffix="support",
        seed=42,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
        extra_body={"adapter": {"type": "lora", "r": 8, "alpha": 16}},
    )
    say(f"{job.id}: {job.status}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        job = demo.sdk.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    estimate = (job.model_extra or {}).get("estimate") or {}
    say(
        f"estimated before it ran: {estimate.get('total_training_tokens')} tokens, "
        f"${estimate.get('price')}"
    )
    for event in reversed(list(demo.sdk.fine_tuning.jobs.list_events(job.id, limit=8))):
        say(f"  {event.level:<5} {event.message}")
    if job.status != "succeeded":
        raise DemoFailure(f"job {job.id} is {job.status}: {job.error}")
    say(f"{job.fine_tuned_model}: {job.trained_tokens} tokens trained")
    checkpoints = demo.sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    say(f"{len(checkpoints)} checkpoint(s), each callable as a model")
    if job.fine_tuned_model not in {m.id for m in demo.sdk.models.list()}:
        raise DemoFailure("the fine-tuned model is not in /v1/models")


def server_is_up(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    base_url = parser.parse_args(argv).base_url.rstrip("/")
    if not server_is_up(base_url):
        print(f"Atelier is not answering at {base_url}/healthz: start it with `make run`.")
        return 1
    print(f"Atelier at {base_url}: a customer's journey, with openai {openai.__version__}")
    demo = Demo(base_url=base_url)
    for number, (title, run) in enumerate(STEPS, start=1):
        print(f"\n[{number}] {title}")
        try:
            run(demo)
        except (DemoFailure, openai.OpenAIError, httpx.HTTPError, KeyError) as exc:
            print(f"    FAILED: {type(exc).__name__}: {exc}")
            return 1
    print(f"\nAll {len(STEPS)} steps passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
