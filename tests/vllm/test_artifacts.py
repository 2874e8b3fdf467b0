"""Token artifacts against a real vLLM (SmolLM2-135M-Instruct on CPU, with the convstate plugin): the ids
the service stores for each turn are exactly those vLLM reported for it, and the append-safety observed
for SmolLM2's template is reported (measured here, not assumed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import wait_for_artifact
from tests.vllm.conftest import Vllm
from tests.vllm.recorder import Recorder

pytestmark = pytest.mark.vllm

QUESTIONS = ("Name a fruit.", "Name another one.", "Which of the two is sweeter?", "Why?")


@pytest.mark.parametrize(("mode", "stream"), [("full", False), ("cache_ref", False), ("cache_ref", True)])
def test_artifacts_hold_the_ids_vllm_reported_and_the_append_safety_of_its_template(
    vllm_service: Any,
    vllm: Vllm,
    recorder: Recorder,
    mode: str,
    stream: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = vllm_service(mode)
    client, admin = service.openai(), service.admin()
    previous, turns = None, []
    for question in QUESTIONS:
        call = {
            "model": vllm.model,
            "input": question,
            "previous_response_id": previous,
            # Room for SmolLM2 to end its answer: a reply cut at the limit ends without <|im_end|>.
            "max_output_tokens": 96,
            "temperature": 0,
        }
        if stream:
            events = list(client.responses.create(**call, stream=True))
            assert events[-1].type in ("response.completed", "response.incomplete")
            previous = events[-1].response.id
        else:
            previous = client.responses.create(**call).id
        exchange = recorder.exchanges[-1]
        assert exchange.status == 200 and exchange.prompt_token_ids and exchange.output_token_ids
        turns.append((previous, exchange))
    artifacts = [wait_for_artifact(admin, response_id, seconds=60) for response_id, _ in turns]
    for artifact, (_, exchange) in zip(artifacts, turns, strict=True):
        assert artifact["prompt_token_ids"] == exchange.prompt_token_ids
        assert artifact["output_token_ids"] == exchange.output_token_ids
    # On the cache path vLLM reported only the ids past the handle's part; the artifacts are whole.
    starts = [exchange.prompt_token_ids_start for _, exchange in turns]
    assert all(starts[1:]) if mode == "cache_ref" else not any(starts)
    assert all(artifact["prompt_token_ids_start"] == 0 for artifact in artifacts)
    # Every later turn has its parent's ids under the same fingerprint: an observation, safe or not.
    assert all(artifact["append_safe"] is not None for artifact in artifacts[1:])
    report: dict[str, Any] = {
        "mode": mode,
        "stream": stream,
        "append_safe": [artifact["append_safe"] for artifact in artifacts[1:]],
        "rates": admin.append_safety(vllm.model)["data"],
        "divergences": [
            {
                key: artifact["divergence"][key]
                for key in ("divergence", "parent_tokens", "parent_text", "text")
            }
            for artifact in artifacts[1:]
            if artifact["divergence"] is not None and not artifact["divergence"]["append_safe"]
        ],
    }
    # Contradictions would mean vLLM's plugin certified a boundary its own ids disprove.
    assert all(row["contradicted"] == 0 for row in report["rates"])
    with capsys.disabled():
        print(f"\nobserved append-safety of {vllm.model}'s template: {json.dumps(report, indent=1)}")
