"""POST /v1/responses/compact: the user's messages and one compaction item, which a new history can start
from; the compacted history renders the summary, and nothing was stored by compacting."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from openai.types.responses import ResponseCompactionItem

from tests.conftest import Service
from tests.oracle import full_render_digest


def test_compact_then_continue_from_the_compacted_items(service: Service) -> None:
    client = service.openai()
    first = client.responses.create(model="ref-chatml", input="We are planning a trip to Lisbon.")
    second = client.responses.create(
        model="ref-chatml", input="Budget is 900 euros.", previous_response_id=first.id
    )
    compacted = client.responses.compact(model="ref-chatml", previous_response_id=second.id)
    assert compacted.object == "response.compaction"
    assert [item.type for item in compacted.output] == ["message", "message", "compaction"]
    compaction = ResponseCompactionItem.model_validate(compacted.output[-1].model_dump())
    assert compaction.id.startswith("cmp_")
    items: list[Any] = [
        {"role": "user", "content": "We are planning a trip to Lisbon."},
        {"role": "user", "content": "Budget is 900 euros."},
        {"type": "compaction", "encrypted_content": compaction.encrypted_content},
        {"role": "user", "content": "What next?"},
    ]
    follow = client.responses.with_raw_response.create(model="ref-chatml", input=items)
    assert follow.headers["x-convstate-decision"] == "full; reason=mode_full"
    summary = orjson.loads(base64.b64decode(compaction.encrypted_content))["summary"]
    assert summary  # the backend's summary of the two turns
    rendered = [
        {"role": "user", "content": "We are planning a trip to Lisbon."},
        {"role": "user", "content": "Budget is 900 euros."},
        {"role": "user", "content": "Summary of the conversation so far:\n" + summary},
        {"role": "user", "content": "What next?"},
    ]
    assert follow.headers["x-convstate-prompt-digest"] == full_render_digest(
        service.settings.backend_url, "ref-chatml", rendered
    )
    assert follow.parse().status == "completed"


def test_compact_errors(service: Service) -> None:
    http = service.http()
    assert http.post("/v1/responses/compact", json={"model": "ref-chatml"}).status_code == 400
    bad = http.post(
        "/v1/responses",
        json={"model": "ref-chatml", "input": [{"type": "compaction", "encrypted_content": "not ours"}]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[0].encrypted_content"
    missing = http.post(
        "/v1/responses/compact", json={"model": "ref-chatml", "previous_response_id": "resp_x"}
    )
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "previous_response_not_found"
