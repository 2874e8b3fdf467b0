"""Prometheus metrics. Decisions by path and reason are the ones to alert on: a drop in `hit` or a rise
in `backend_miss:*` means the cache path stopped paying."""

from __future__ import annotations

import functools
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


@functools.cache
def labelled(metric: M, *values: str) -> M:
    """`metric.labels(*values)`, made once per label values: `labels` checks and locks on every call, and
    the request path counts several metrics per request. Label values are as bounded as the metric's own
    children, which prometheus keeps anyway."""
    return metric.labels(*values)


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

requests = Counter("convstate_requests_total", "HTTP requests", ["method", "route", "status"])
request_seconds = Histogram(
    "convstate_request_seconds", "HTTP request latency", ["method", "route"], buckets=LATENCY_BUCKETS
)
stage_seconds = Histogram(
    "convstate_stage_seconds",
    "Time per request spent in a stage (db, backend)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
# Observed on every request: labelled once.
db_seconds = stage_seconds.labels("db")
backend_seconds = stage_seconds.labels("backend")
decisions = Counter("convstate_decisions_total", "Turn decisions", ["path", "reason"])
fallbacks = Counter("convstate_backend_misses_total", "Cache references the backend refused", ["code"])
bytes_forwarded = Counter(
    "convstate_backend_bytes_sent_total", "Request bytes forwarded to the backend", ["path"]
)
prompt_tokens = Counter("convstate_backend_prompt_tokens_total", "Prompt tokens reported by the backend")
cached_tokens = Counter(
    "convstate_backend_cached_tokens_total", "Cached prompt tokens reported by the backend"
)
canary_checks = Counter("convstate_canary_checks_total", "Canary full renders compared", ["result"])
db_pool_checked_out = Gauge(
    "convstate_db_pool_checked_out",
    "Database connections in use (both pools: the turns' statements and the rest)",
)
kept_histories = Counter(
    "convstate_kept_histories_total",
    "Full-path chain turns whose history was kept by this process (hit) or read from the database (miss)",
    ["result"],
)
artifact_queue_depth = Gauge("convstate_artifact_queue_depth", "Turns waiting for the artifact writer")
artifact_drops = Counter(
    "convstate_artifact_drops_total", "Token artifacts not stored", ["reason"]
)  # queue_full, write_failed
artifacts_written = Counter("convstate_artifacts_written_total", "Token artifacts stored")
append_safety = Counter(
    "convstate_append_safety_observations_total",
    "Turns whose parent's prompt + output ids were (safe) or were not (unsafe) a prefix of their prompt",
    ["model", "template", "result"],
)
append_safety_contradictions = Counter(
    "convstate_append_safety_contradictions_total",
    "Prefix records invalidated because observed ids contradicted their safe-boundary claim",
    ["model"],
)
replay_requests = Counter(
    "convstate_replay_requests_total",
    "Requests through the replay cache by how they were answered: hit, coalesced (waited for an identical "
    "request's call), miss, refresh, bypass, uncacheable, wait_timeout",
    ["endpoint", "result"],
)
replay_removed = Counter(
    "convstate_replay_removed_total",
    "Replay-cache entries removed automatically: expired, evicted (size bound), fingerprint (model changed)",
    ["reason"],
)
