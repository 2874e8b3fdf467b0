"""Test data builders."""

from __future__ import annotations

import time
from typing import Any

from service.domain import ids
from service.domain.policy import ParentPrefix
from service.store.responses import PrefixWrite, StoredResponse


def stored_response(tenant: str, **overrides: Any) -> StoredResponse:
    """A completed, stored response with no output; override any field."""
    now = time.time()
    fields: dict[str, Any] = {
        "id": ids.new_id(ids.RESPONSE),
        "tenant": tenant,
        "model": "m",
        "status": "completed",
        "previous_response_id": None,
        "conversation_id": None,
        "depth": 0,
        "instructions": None,
        "settings": {},
        "usage": None,
        "error": None,
        "incomplete_details": None,
        "store": True,
        "background": False,
        "created_at": now,
        "completed_at": now,
    }
    fields.update(overrides)
    fields.setdefault("lineage_root", fields["id"])
    fields.setdefault("thread", fields["id"])
    return StoredResponse(**fields)


def prefix_write(handle: str | None = None) -> PrefixWrite:
    """A valid prefix record of a full-path turn, with a handle if named."""
    return PrefixWrite(
        status="valid",
        decision_path="full",
        decision_reason="no_parent",
        prompt_tokens=10,
        prompt_digest="ab" * 16,
        cached_tokens=0,
        reused_tokens=0,
        bytes_sent=100,
        turn_tokens=12,
        safe_boundary=True,
        safe_tokens=12,
        prefix_hash="cd" * 16,
        covers_output=True,
        fingerprint="ef" * 16,
        backend_fingerprint="12" * 16,
        fingerprint_parts={"model": "x"},
        handle_ref=handle,
        handle_endpoint=None,
        handle_epoch="e1" if handle else None,
        handle_expires_at=time.time() + 60 if handle else None,
        conversation_version=None,
    )


def parent_prefix(**changes: Any) -> ParentPrefix:
    """A parent's valid record with a live handle, as the planner reads it."""
    values: dict[str, Any] = {
        "valid": True,
        "fingerprint_parts": None,
        "handle_ref": "pc_1",
        "backend_fingerprint": "f",
        "handle_epoch": "e",
        "handle_expires_at": 2e9,
        "safe_tokens": 10,
        "prefix_hash": "ab",
        "covers_output": False,
        "created_at": 0.0,
        "conversation_version": None,
    }
    return ParentPrefix(**{**values, **changes})
