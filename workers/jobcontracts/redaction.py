"""What never reaches a log line: secrets, API keys, prompt text, file contents.

Both sides' log configurations run `redact` last before rendering (the control plane's
`controlplane.core.logs`, the GPU workers' `gpuworkers.logs`), on every line, whoever
logged it: a value under a sensitive key is replaced whole, and anything that looks
like an API key (`atl_live_<prefix>_<secret>`, a `Bearer` token) is cut down to its
public prefix wherever it appears, the message and a traceback included.

Standard library only (this package's rule), so it is a plain function with
structlog's processor signature.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

REDACTED = "[redacted]"

#: Keys whose value is dropped whole, compared lower-cased with `-` read as `_`.
SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "x_api_key",
        "api_key",
        "apikey",
        "key",
        "secret",
        "password",
        "password1",
        "password2",
        "new_password",
        "old_password",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "session",
        "sessionid",
        "csrftoken",
        "messages",
        "message_content",
        "prompt",
        "prompts",
        "input",
        "inputs",
        "content",
        "contents",
        "text",
        "body",
        "file",
        "file_content",
        "file_contents",
        "raw",
        "data_uri",
        # Celery's task lines (`data`): a task's arguments and result carry its payload.
        "args",
        "kwargs",
        "return_value",
    }
)
#: Key endings that are sensitive too (`stripe_secret`, `client_secret`, `db_password`).
_SENSITIVE_ENDINGS = ("_secret", "_password", "_api_key", "_token", "_authorization")

#: Atelier's keys (`controlplane.accounts.keys`): `atl_live_<prefix 8>_<secret 40><checksum 6>`.
#: The prefix is public (listings show it); the rest goes. Loose on purpose: a truncated
#: or mistyped key is still a secret.
API_KEY = re.compile(r"(atl_[a-z]+_[0-9A-Za-z]{8})_?[0-9A-Za-z]*")
_BEARER = re.compile(
    r"(?i)\b(bearer\s+)(?!atl_)[A-Za-z0-9._~+/=\-]{8,}|\b(basic\s+)[A-Za-z0-9+/=]{12,}"
)
#: user:password@ in a URL (a broker or database URL in an error message).
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.\-]*://[^/\s:@]*:)[^@\s/]+@")

_MAX_DEPTH = 6


def is_sensitive(key: object) -> bool:
    name = str(key).lower().replace("-", "_")
    return name in SENSITIVE_KEYS or name.endswith(_SENSITIVE_ENDINGS)


def scrub_text(text: str) -> str:
    """`text` with API keys cut to their public prefix, bearer tokens and URL passwords gone."""
    if "atl_" in text:
        text = API_KEY.sub(lambda m: f"{m.group(1)}_{REDACTED}", text)
    if " " in text:
        text = _BEARER.sub(lambda m: f"{m.group(1) or m.group(2)}{REDACTED}", text)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return text


def scrub(value: Any, depth: int = 0) -> Any:
    """A copy of `value` (str, mapping, list, tuple; else as is) with secrets removed."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"  # file contents, request bodies: never their bytes
    if depth >= _MAX_DEPTH:
        return value if isinstance(value, int | float | bool) or value is None else REDACTED
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_sensitive(k) else scrub(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v, depth + 1) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return scrub_text(str(value))  # what a renderer would print of it, scrubbed


#: Keys of the log line itself that are ours, never a caller's data.
_STRUCTURAL = frozenset({"event", "level", "logger", "timestamp", "exception", "stack"})
#: structlog's own entries, left for the processors after this one.
_PASS = frozenset({"exc_info", "stack_info", "_record", "_from_structlog"})


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: the event with every sensitive key's value replaced and every
    string scrubbed (`scrub`). Run it last, after exceptions are formatted."""
    for key in list(event_dict):
        if key in _PASS:
            continue
        if key not in _STRUCTURAL and is_sensitive(key):
            event_dict[key] = REDACTED
        else:
            value = event_dict[key]
            if not isinstance(value, int | float | bool) and value is not None:
                event_dict[key] = scrub(value)
    return event_dict
