"""The differential property: over random conversations and random mutations between turns, the exact
token sequence the backend generated from (its prompt digest) equals a full render of the same history,
and the backend never continued from KV computed under another fingerprint, salt or render context.

The backend here trusts every handle it is given (verify_handles off) and counts stale reuses, so a wrong
decision by the service cannot be rescued by the backend's own checks. Turns are plain, streamed or in
the background; conversations are previous_response_id chains or Conversations-API conversations (with
items added between turns); between turns the instructions, tools (and the key order of their schemas),
reasoning effort, response format and parallel tool calls change, images come by value or by a URL
whose bytes change, and the backend restarts, evicts or expires handles. A child sent while its
background parent is still running must be refused. The oracle keeps its own copy of the history as
chat messages, built here independently of the service's item conversion, and asks the backend for a
full render. Afterwards each turn's token artifact must show its observed append-safety exactly where
the template profile breaks it (reasoning dropped from history, a late system message merged into the
first block). Runs a bounded, derandomized number of examples in CI; CONVSTATE_PROPERTY_EXAMPLES and
CONVSTATE_PROPERTY_TURNS raise it.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.serving import ServerThread
from tests.conftest import MediaServer, Service, start_service, wait_for_artifact
from tests.oracle import assistant_message, full_render_digest, recorded_digest

EXAMPLES = int(os.environ.get("CONVSTATE_PROPERTY_EXAMPLES", "20"))
MAX_TURNS = int(os.environ.get("CONVSTATE_PROPERTY_TURNS", "30"))

MODELS = ("ref-chatml", "ref-reasoning-trim", "ref-system-once")
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
}
WEATHER = {
    "type": "function",
    "name": "weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


def _reordered(tool: dict[str, Any]) -> dict[str, Any]:
    """The same tool with the keys of its schema in another order: another prompt for a real template."""
    parameters = tool["parameters"]
    properties = parameters["properties"]
    return {
        **tool,
        "parameters": {
            "required": parameters["required"],
            "properties": {key: properties[key] for key in reversed(properties)},
            "type": "object",
        },
    }


TOOLSETS: dict[str, list[dict[str, Any]] | None] = {
    "none": None,
    "one": [LOOKUP],
    "two": [LOOKUP, WEATHER],
    "two-reordered": [_reordered(LOOKUP), _reordered(WEATHER)],
}
FORMATS: dict[str, dict[str, Any] | None] = {
    "text": None,
    "json_object": {"type": "json_object"},
    "json_schema": {
        "type": "json_schema",
        "name": "answer",
        "schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
    },
}
PNG = "data:image/png;base64," + base64.b64encode(b"a small image").decode()
INSTRUCTIONS = (None, "Be brief.", "Answer like a ship's log.\n  Indented second line.")
EFFORTS = (None, "low", "high")
FAULTS = (None, "restart", "evict", "expire", "image_changed")
PARALLEL = (None, True, False)
# Pieces, not characters: runs of spaces and newlines at the edges are where tokenizers merge differently.
TEXT = st.lists(
    st.sampled_from(
        [
            "a",
            "bc",
            "Def",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\t",
            "0",
            "42",
            ".",
            "?",
            '"',
            "{",
            "}",
            "é",
            "日本",
            "—",
        ]
    ),
    min_size=1,
    max_size=20,
).map("".join)


def _rarely(strategy: st.SearchStrategy[Any], default: Any, one_in: int = 4) -> st.SearchStrategy[Any]:
    """`default` most of the time, so that hits are common and mutations stand out."""
    return st.integers(0, one_in - 1).flatmap(lambda roll: strategy if roll == 0 else st.just(default))


@dataclass(frozen=True)
class Turn:
    text: str
    instructions: str | None
    toolset: str
    effort: str | None
    late_system: str | None
    call_tool: bool
    fault: str | None
    canary: bool
    delivery: str  # plain | stream | background
    aside: str | None  # conversation mode: an item added through the Conversations API first
    text_format: str
    parallel: bool | None
    image: str | None  # None | "data" | "http"
    early_child: bool  # background: send a child before the parent has finished


@st.composite
def conversations(draw: st.DrawFn) -> tuple[str, bool, list[Turn]]:
    """(model, in a Conversations-API conversation rather than a previous_response_id chain, turns)"""
    model = draw(st.sampled_from(MODELS))
    in_conversation = draw(st.booleans())
    turns: list[Turn] = []
    instructions, toolset, effort = draw(st.sampled_from(INSTRUCTIONS)), "none", None
    text_format, parallel = "text", None
    for _ in range(draw(st.integers(1, MAX_TURNS))):
        instructions = draw(_rarely(st.sampled_from(INSTRUCTIONS), instructions))
        toolset = draw(_rarely(st.sampled_from(list(TOOLSETS)), toolset))
        effort = draw(_rarely(st.sampled_from(EFFORTS), effort))
        text_format = draw(_rarely(st.sampled_from(list(FORMATS)), text_format, one_in=6))
        parallel = draw(_rarely(st.sampled_from(PARALLEL), parallel, one_in=6))
        turns.append(
            Turn(
                text=draw(TEXT),
                instructions=instructions,
                toolset=toolset,
                effort=effort,
                late_system=draw(_rarely(st.sampled_from(["New rule.", "Be exact."]), None, one_in=6)),
                call_tool=draw(_rarely(st.just(True), False, one_in=3)),
                fault=draw(_rarely(st.sampled_from(FAULTS), None, one_in=8)),
                canary=draw(st.booleans()),
                delivery=draw(_rarely(st.sampled_from(["stream", "background"]), "plain", one_in=3)),
                aside=draw(_rarely(st.just("An aside."), None, one_in=8)),
                text_format=text_format,
                parallel=parallel,
                image=draw(_rarely(st.sampled_from(["data", "http"]), None, one_in=6)),
                early_child=draw(st.booleans()),
            )
        )
    return model, in_conversation, turns


REASONING_TURN = Turn(
    text="Think it over.",
    instructions=None,
    toolset="none",
    effort="high",
    late_system=None,
    call_tool=False,
    fault=None,
    canary=False,
    delivery="plain",
    aside=None,
    text_format="text",
    parallel=None,
    image=None,
    early_child=False,
)


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    return [
        {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in tools
    ]


def _poll(http: httpx.Client, response_id: str) -> dict[str, Any]:
    for _ in range(400):
        polled: dict[str, Any] = http.get(f"/v1/responses/{response_id}").json()
        if polled["status"] not in ("queued", "in_progress"):
            return polled
        time.sleep(0.02)
    raise AssertionError("a background turn did not finish")


def _send(
    service: Service, body: dict[str, Any], delivery: str, early_child: dict[str, Any] | None
) -> tuple[dict[str, Any], httpx.Headers]:
    """One turn, plain, streamed or in the background; the response object as the client finally sees it.
    With `early_child`, a background turn is followed at once by a child of it, which must be refused
    while the parent is still queued or running (and is dropped if the parent already finished)."""
    with service.http() as http:
        if delivery == "background":
            reply = http.post("/v1/responses", json={**body, "background": True})
            assert reply.status_code == 200, reply.text
            if early_child is not None:
                child = http.post(
                    "/v1/responses", json={**early_child, "previous_response_id": reply.json()["id"]}
                )
                if child.status_code == 400:
                    assert child.json()["error"]["code"] == "previous_response_in_progress", child.text
                else:
                    assert child.status_code == 200, child.text
            return _poll(http, reply.json()["id"]), reply.headers
        if delivery == "plain":
            reply = http.post("/v1/responses", json=body)
            assert reply.status_code == 200, reply.text
            return reply.json(), reply.headers
        with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as reply:
            assert reply.status_code == 200, reply.read()
            frames = reply.read().split(b"\n\n")
    last = orjson.loads(next(frame for frame in reversed(frames) if frame).split(b"\ndata: ", 1)[1])
    assert last["type"] == "response.completed" or last["type"] == "response.incomplete", last
    return last["response"], reply.headers


def _chat_format(text_format: str) -> dict[str, Any] | None:
    fmt = FORMATS[text_format]
    if fmt is None or fmt["type"] == "json_object":
        return fmt
    return {"type": "json_schema", "json_schema": {"name": fmt["name"], "schema": fmt["schema"]}}


class Images:
    """The image a turn shows: by value, or by a loopback URL whose bytes a fault changes."""

    def __init__(self, media: MediaServer) -> None:
        self.media = media
        self.version = 0
        self.url = media.put("shared.png", b"image-0")

    def change(self) -> None:
        self.version += 1
        self.media.put("shared.png", f"image-{self.version}".encode())

    def parts(self, kind: str, text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(Responses input content, chat content) of a user message with the image."""
        url = PNG if kind == "data" else self.url
        return (
            [{"type": "input_text", "text": text}, {"type": "input_image", "image_url": url}],
            [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        )


def run_conversation(
    plain: Service,
    canary: Service,
    admin: httpx.Client,
    images: Images,
    model: str,
    in_conversation: bool,
    turns: list[Turn],
    observations: list[tuple[str, bool]],
) -> list[tuple[str, str]]:
    """Runs one conversation; returns each turn's (decision, delivery), and adds to `observations` the
    append-safety each turn's artifact must show when it shares its parent's fingerprint."""
    conversation = plain.http().post("/v1/conversations", json={}).json()["id"] if in_conversation else None
    history: list[dict[str, Any]] = []
    pending_calls: list[dict[str, Any]] = []
    previous: str | None = None
    previous_response: dict[str, Any] | None = None
    decisions: list[tuple[str, str]] = []
    stale_before = admin.get("/stats").json()["stale_reuses"]
    for turn in turns:
        if turn.fault == "restart":
            admin.post("/admin/restart").raise_for_status()
        elif turn.fault == "evict":
            admin.post("/admin/evict", json={}).raise_for_status()
        elif turn.fault == "expire":
            admin.post("/admin/expire").raise_for_status()
        elif turn.fault == "image_changed":
            images.change()
        if conversation and turn.aside:
            aside = {"role": "user", "content": turn.aside}
            plain.http().post(
                f"/v1/conversations/{conversation}/items", json={"items": [aside]}
            ).raise_for_status()
            history.append(aside)
        tools = TOOLSETS[turn.toolset]
        items: list[dict[str, Any]] = []
        if pending_calls:
            for call in pending_calls:
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": call["call_id"],
                        "output": f"{call['name']}=42",
                    }
                )
                history.append(
                    {"role": "tool", "tool_call_id": call["call_id"], "content": f"{call['name']}=42"}
                )
        else:
            if turn.late_system:
                items.append({"role": "developer", "content": turn.late_system})
                history.append({"role": "developer", "content": turn.late_system})
            text = f"{turn.text} please call {tools[0]['name']}" if turn.call_tool and tools else turn.text
            if turn.image:
                content, chat_content = images.parts(turn.image, text)
                items.append({"role": "user", "content": content})
                history.append({"role": "user", "content": chat_content})
            else:
                items.append({"role": "user", "content": text})
                history.append({"role": "user", "content": text})
        # Room for reasoning to end its message: a reply cut short is not observed (below).
        body: dict[str, Any] = {
            "model": model,
            "input": items,
            "max_output_tokens": 128 if turn.effort else 48,
        }
        if conversation:
            body["conversation"] = conversation
        elif previous:
            body["previous_response_id"] = previous
        if turn.instructions:
            body["instructions"] = turn.instructions
        if tools:
            body["tools"] = tools
            if turn.parallel is not None:
                body["parallel_tool_calls"] = turn.parallel
        if turn.effort:
            body["reasoning"] = {"effort": turn.effort}
        if FORMATS[turn.text_format] is not None:
            body["text"] = {"format": FORMATS[turn.text_format]}
        service = canary if turn.canary else plain
        early_child = None
        if turn.early_child and not conversation:
            early_child = {"model": model, "input": "A child sent too early.", "max_output_tokens": 16}
        response, headers = _send(service, body, turn.delivery, early_child)
        assert response["status"] in ("completed", "incomplete"), response
        expected = ([{"role": "system", "content": turn.instructions}] if turn.instructions else []) + history
        render: dict[str, Any] = {}
        if tools:
            render["tools"] = _chat_tools(tools)
        if turn.effort:
            render["reasoning_effort"] = turn.effort
        if _chat_format(turn.text_format) is not None:
            render["response_format"] = _chat_format(turn.text_format)
        decision = headers["x-convstate-decision"]
        digest = (
            headers["x-convstate-prompt-digest"]
            if turn.delivery == "plain"
            else recorded_digest(plain.settings.database_url, response["id"])
        )
        assert digest == full_render_digest(plain.settings.backend_url, model, expected, **render), (
            f"turn {len(decisions)} ({decision}) generated from a prompt that differs from the full render"
        )
        stale = admin.get("/stats").json()["stale_reuses"]
        assert stale == stale_before, f"turn {len(decisions)} ({decision}) continued from stale KV"
        decisions.append((decision, turn.delivery))
        if previous_response is not None and previous_response["status"] == "completed":
            # (A reply cut by max_output_tokens ends without the end-of-message token its re-render
            # has: whether its ids still continue depends on where the cut fell, so it is not asserted.)
            reasoned = any(item["type"] == "reasoning" for item in previous_response["output"])
            trimmed = model == "ref-reasoning-trim" and reasoned
            merged = model == "ref-system-once" and any(item.get("role") == "developer" for item in items)
            observations.append((response["id"], not (trimmed or merged)))
        previous_response = response
        history.append(assistant_message(response["output"]))
        pending_calls = [item for item in response["output"] if item["type"] == "function_call"]
        previous = response["id"]
    return decisions


def _canary_counts(service: Service) -> dict[str, float]:
    """The canary counters, once the checks still running off the hot path have settled."""

    def read() -> dict[str, float]:
        lines = service.http().get("/metrics").text.splitlines()
        counts = {}
        for result in ("match", "mismatch"):
            prefix = f'convstate_canary_checks_total{{result="{result}"}} '
            counts[result] = sum(float(line[len(prefix) :]) for line in lines if line.startswith(prefix))
        return counts

    previous = read()
    for _ in range(50):
        time.sleep(0.1)
        current = read()
        if current == previous:
            break
        previous = current
    return previous


def test_cache_path_renders_exactly_the_full_history(
    migrated_urls: dict[str, str], trusting_backend: ServerThread, media_server: MediaServer
) -> None:
    url = trusting_backend.url
    plain = start_service(migrated_urls["postgres"], url, backend_mode="cache_ref")
    canary = start_service(migrated_urls["postgres"], url, backend_mode="cache_ref", canary_fraction=1.0)
    images = Images(media_server)
    seen: set[tuple[str, str]] = set()
    observations: list[tuple[str, bool]] = []
    turns_run = 0

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(conversations())
    def check(conversation: tuple[str, bool, list[Turn]]) -> None:
        nonlocal turns_run
        model, in_conversation, turns = conversation
        with httpx.Client(base_url=url) as admin:
            decisions = run_conversation(
                plain, canary, admin, images, model, in_conversation, turns, observations
            )
        seen.update(decisions)
        turns_run += len(decisions)

    try:
        check()
        # And always one conversation whose replies reason on the template that drops earlier reasoning:
        # its unsafe appends show in the output ids (a late system message's, in the prompt ids, are
        # common among the examples).
        with httpx.Client(base_url=url) as admin:
            run_conversation(
                plain, canary, admin, images, "ref-reasoning-trim", False, [REASONING_TURN] * 3, observations
            )
        # The canary re-renders every hit of the canary service in full, off the hot path: against a
        # faithful backend it must never find a mismatch (a false one would invalidate good records).
        canary_checks = _canary_counts(canary)
        artifacts = [
            (wait_for_artifact(plain.admin(), response_id), safe) for response_id, safe in observations
        ]
    finally:
        plain.server.stop()
        canary.server.stop()
    print(f"differential property: {turns_run} turns, {len(seen)} distinct (decision, delivery) pairs")
    assert canary_checks["mismatch"] == 0 and canary_checks["match"] > 0, canary_checks
    # The examples must have exercised both paths, or the property says nothing about the cache path.
    decisions = {decision for decision, _ in seen}
    assert "cache_ref; reason=hit" in decisions and "cache_ref; reason=canary" in decisions
    assert any(decision.startswith("full; reason=") and "no_parent" not in decision for decision in decisions)
    assert ("cache_ref; reason=hit", "stream") in seen, "no streamed turn took the cache path"
    assert ("cache_ref; reason=hit", "background") in seen, "no background turn took the cache path"
    assert "full; reason=history_edited" in decisions, "no conversation edit was exercised"
    assert "full; reason=fingerprint_unknown:media" in decisions, "no image by URL was exercised"
    assert "full; reason=tools_changed" in decisions
    assert "full; reason=fingerprint_mismatch:response_format" in decisions
    # Observed append-safety, wherever the turn shares its parent's fingerprint (else nothing to compare).
    compared = [(artifact, safe) for artifact, safe in artifacts if artifact["append_safe"] is not None]
    wrong = [
        (a["response_id"], a["model"], a["append_safe"], safe)
        for a, safe in compared
        if a["append_safe"] != safe
    ]
    assert not wrong, f"observed append-safety differs from the template's: {wrong}"
    assert any(safe for _, safe in compared)
    unsafe = sorted({a["model"] for a, safe in compared if not safe})
    print(f"append-safety: {len(compared)} turns compared, unsafe ones on {unsafe}")
    # Both ways a template rewrites history were observed: reasoning dropped from an earlier reply (its
    # output ids), a late system message merged into the first block (its prompt ids).
    assert unsafe == ["ref-reasoning-trim", "ref-system-once"], unsafe
    assert all(artifact["diagnostic"] is None for artifact, _ in artifacts)
