"""Test data builders."""

from __future__ import annotations

import time
from typing import Any

from service.domain import ids
from service.store.responses import StoredResponse


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
    return StoredResponse(**fields)
