"""Metrics (Prometheus): who may read the web's `/metrics`, and the workers' own ports."""

from .env import env

#: Count and time every HTTP request (`core.metrics`); off only to measure what it costs.
METRICS_ENABLED = env.bool("METRICS_ENABLED", default=True)
#: Networks whose direct requests (no proxy header) may read `GET /metrics` without a
#: token: loopback and the private ranges, where Prometheus scrapes pods and hosts from.
METRICS_ALLOWED_NETWORKS = env.list(
    "METRICS_ALLOWED_NETWORKS",
    default=[
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ],
)
#: With it set, `Authorization: Bearer <METRICS_TOKEN>` reads `/metrics` from anywhere.
#: Empty (the default): only METRICS_ALLOWED_NETWORKS may.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
#: The control worker's metrics port (`atelier worker control`); 0 serves none.
CONTROL_METRICS_PORT = env.int("CONTROL_METRICS_PORT", default=9101)
#: The address the control worker's metrics port listens on.
CONTROL_METRICS_HOST = env.str("CONTROL_METRICS_HOST", default="0.0.0.0")  # noqa: S104
