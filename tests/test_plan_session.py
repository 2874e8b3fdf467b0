"""The turn plan's part in artifacts, reseed and llm-d routing: token ids asked for stored turns, the
session hints of affinity mode, and the seed body that replaces a failed handle."""

from __future__ import annotations

import dataclasses
from typing import Any

from service.domain import plan as planning
from service.domain.chat import chat_options
from service.domain.fingerprint import ENVELOPE_FIELDS, SAMPLING_FIELDS, combined_fingerprint
from service.domain.policy import BackendMode, Path
from tests.factories import parent_prefix
from tests.test_fingerprint import BACKEND

INPUT = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
OUTPUT = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]}]
TOKEN = "bGxtLWQvcG9kLTA="


def _inputs(mode: BackendMode, **changes: Any) -> planning.TurnInputs:
    render = planning.RenderInputs("m", "Be brief.", INPUT, chat_options({}), "salt")
    inputs = planning.TurnInputs(
        render=render,
        mode=mode,
        store=True,
        backend=dataclasses.replace(BACKEND, seeds=True),
        parent=None,
        has_parent=True,
        conversation_version=None,
        now=1.0,
        lineage_root="resp_root",
        token_ids=True,
    )
    return dataclasses.replace(inputs, **changes)


def _with_parent(inputs: planning.TurnInputs, **prefix_changes: Any) -> planning.TurnInputs:
    prefix = parent_prefix(fingerprint_parts=planning.plan_turn(inputs).parts, session_token=TOKEN)
    parent = planning.ParentState(
        "resp_1", "completed", OUTPUT, dataclasses.replace(prefix, **prefix_changes)
    )
    return dataclasses.replace(inputs, parent=parent)


def test_stored_turns_ask_for_token_ids_as_a_sampling_field() -> None:
    stored = planning.plan_turn(_inputs(BackendMode.FULL))
    assert stored.full_body([])["return_token_ids"] is True
    unstored = planning.plan_turn(_inputs(BackendMode.FULL, store=False))
    assert "return_token_ids" not in unstored.full_body([])
    # Asking for ids changes nothing that is rendered: the fingerprint is the same.
    assert stored.parts == unstored.parts


def test_affinity_sends_the_lineage_session_and_the_parent_token_while_its_record_holds() -> None:
    first = planning.plan_turn(_inputs(BackendMode.AFFINITY, has_parent=False))
    session = planning.session_id("resp_root")
    assert first.headers == {"x-session-id": session}
    assert session.startswith("cs-") and "resp_root" not in session
    hit = planning.plan_turn(_with_parent(_inputs(BackendMode.AFFINITY)))
    assert hit.decision.path is Path.AFFINITY
    assert hit.headers == {
        "x-session-id": session,
        "x-session-token": TOKEN,
        "cookie": f"llm-d-session={TOKEN}",
    }
    assert hit.cache_body is None  # the full history goes; the token only routes it
    invalidated = planning.plan_turn(_with_parent(_inputs(BackendMode.AFFINITY), valid=False))
    assert invalidated.headers == {"x-session-id": session}
    # Other modes send no routing hints.
    assert planning.plan_turn(_with_parent(_inputs(BackendMode.CACHE_REF))).headers == {}


def test_affinity_names_the_lineage_as_the_user_unless_the_client_named_one() -> None:
    session = planning.session_id("resp_root")
    hit = planning.plan_turn(_with_parent(_inputs(BackendMode.AFFINITY)))
    assert hit.full_body([])["user"] == session
    # Only in affinity mode, and a client's own user (or safety identifier) goes as it sent it.
    assert "user" not in planning.plan_turn(_with_parent(_inputs(BackendMode.CACHE_REF))).full_body([])
    inputs = _inputs(BackendMode.AFFINITY)
    own = dataclasses.replace(inputs.render, settings=chat_options({"safety_identifier": "alice"}))
    assert planning.plan_turn(dataclasses.replace(inputs, render=own)).full_body([])["user"] == "alice"
    # The hint renders nothing: the fingerprint is the other modes'.
    assert hit.parts == planning.plan_turn(_with_parent(_inputs(BackendMode.CACHE_REF))).parts


def test_every_field_a_plan_adds_is_declared_outside_the_fingerprint() -> None:
    """The request's settings reach the fingerprint (test_fingerprint); whatever else a plan sends must be
    an envelope or a sampling field, or the record would not cover what the backend was told."""
    for mode in BackendMode:
        for inputs in (_inputs(mode, has_parent=False), _with_parent(_inputs(mode))):
            plan = planning.plan_turn(inputs)
            bodies = [plan.full_body([]), plan.cache_body, plan.seed_base]
            for body in filter(None, bodies):
                added = body.keys() - plan.render.settings.keys()
                assert added <= ENVELOPE_FIELDS | SAMPLING_FIELDS, (mode, added)


def test_the_seed_body_is_the_cache_body_with_ids_in_place_of_the_handle() -> None:
    inputs = _with_parent(_inputs(BackendMode.CACHE_REF))
    hit = planning.plan_turn(inputs)
    assert hit.cache_body is not None and hit.seed_base is not None
    assert hit.seed_fingerprint == combined_fingerprint(hit.parts)
    body = hit.seed_body([1, 2, 3], [4])
    assert body["messages"] == hit.cache_body["messages"]  # the parent's reply, then the input
    assert body["prompt_cache"] == {
        "seed": {"covers_output": False, "prompt_token_ids": [1, 2, 3], "output_token_ids": [4]},
        "fingerprint": "f",
        "register": True,
    }
    assert hit.sent_parts(body) == hit.parts
    restarted = planning.plan_turn(
        dataclasses.replace(inputs, backend=dataclasses.replace(BACKEND, seeds=True, epoch="e2"))
    )
    assert restarted.decision.reason == "backend_epoch_changed" and restarted.seed_base is not None
    # Without the backend's support, after an invalidation, or in another mode: no seed.
    assert planning.plan_turn(dataclasses.replace(inputs, backend=BACKEND)).seed_base is None
    assert planning.plan_turn(_with_parent(_inputs(BackendMode.CACHE_REF), valid=False)).seed_base is None
    assert planning.plan_turn(_with_parent(_inputs(BackendMode.AFFINITY))).seed_base is None
