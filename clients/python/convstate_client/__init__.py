"""Typed sync and async client for convstate's admin API and its extensions of the OpenAI API."""

from convstate_client.client import ApiError, AsyncClient, Client, Decision, decision
from convstate_client.types import (
    CreatedKey,
    Handle,
    Inspection,
    Invalidation,
    Invalidations,
    Key,
    Keys,
    RetentionRun,
    Stats,
    StatsGroup,
    Tenant,
    Tenants,
    Turn,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "CreatedKey",
    "Decision",
    "Handle",
    "Inspection",
    "Invalidation",
    "Invalidations",
    "Key",
    "Keys",
    "RetentionRun",
    "Stats",
    "StatsGroup",
    "Tenant",
    "Tenants",
    "Turn",
    "decision",
]
