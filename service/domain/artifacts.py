"""Token artifacts: the packed form of a turn's token ids, and the append-safety observed from them.

Pure. The pipeline hands a committed turn's ids (`TurnTokens`) to the artifact writer; the writer packs
them (little-endian uint32, as `domain.prefix` hashes them, then zlib) and compares them with the
parent's: a turn is *append-safe* when its parent's prompt ids followed by the parent's output ids are an
exact prefix of its own prompt ids, i.e. the backend could have continued from the KV it already computed
for the parent. Templates that rewrite history (reasoning dropped from earlier turns, system messages
merged into the first block) break that, at the index `divergence`.

A turn that continued its parent's handle is told only the prompt ids from `prompt_start` on: the ones
before are, by the protocol, the first ids of the parent's prompt. That is also what is stored, so a
turn's reply, its artifact and the writer's work follow what the turn added, not the conversation; the
rare readers of a whole prompt (reseed, the admin view) rebuild it from the chain (`rebuild`).
"""

from __future__ import annotations

import sys
import zlib
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.domain.prefix import pack_tokens, token_digest

# zlib's fastest level: token ids compress about 2x at level 1 and barely better above it.
COMPRESSION_LEVEL = 1
# Ids shown on each side of a divergence in a diagnostic.
DIAGNOSTIC_WINDOW = 8
# The prefix record's status reason when an observation contradicts its safe-boundary claim.
CONTRADICTED = "append_unsafe_observed"


def pack(token_ids: Sequence[int]) -> bytes:
    data = pack_tokens(token_ids)
    # zlib sets up and clears its window and hash table on every call: 256 KiB at its defaults, which for
    # a turn's few hundred ids cost several times the compressing. A window no larger than the data (at
    # least zlib's smallest, 512 bytes) and a hash table to match compress as well, or within a few per
    # cent; `unpack` reads any window size.
    window_bits = min(15, max(9, (len(data) - 1).bit_length()))
    packer = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, window_bits, max(1, window_bits - 7))
    return packer.compress(data) + packer.flush()


def unpack(blob: bytes) -> list[int]:
    ids = array("I")
    ids.frombytes(zlib.decompress(blob))
    if sys.byteorder != "little":  # pragma: no cover
        ids.byteswap()
    return ids.tolist()


@dataclass(frozen=True, slots=True)
class TurnTokens:
    """A committed turn's token ids as the backend reported them (`return_token_ids`), for the writer."""

    response_id: str
    tenant: str
    model: str
    parent_id: str | None
    # The prefix record's combined fingerprint; None when a part is unknown (never comparable).
    fingerprint: str | None
    template: str | None
    decision: str
    # The turn continued its parent's record (a cache-path or affinity hit): it relied on the parent's
    # claim of a safe boundary.
    relied_on_parent: bool
    prompt_ids: Sequence[int]  # from `prompt_start` on
    output_ids: Sequence[int]
    created_at: float
    expires_at: float
    prompt_start: int = 0


@dataclass(frozen=True, slots=True)
class StoredIds:
    """A turn's ids as stored: its prompt from `prompt_start` on (the ids before it are its parent's
    prompt's first ones), and its output."""

    prompt_start: int
    prompt: Sequence[int]
    output: Sequence[int]


def rebuild(links: Sequence[tuple[int, bytes]]) -> list[int] | None:
    """A whole prompt from its chain's packed links `(prompt_start, prompt ids)`, oldest first: the first
    must be whole; each next one replaces what follows its start. None when the chain is broken."""
    if not links or links[0][0] != 0:
        return None
    prompt = unpack(links[0][1])
    for start, packed in links[1:]:
        if len(prompt) < start:
            return None
        prompt = [*prompt[:start], *unpack(packed)]
    return prompt


@dataclass(frozen=True, slots=True)
class AppendObservation:
    append_safe: bool
    divergence: int | None  # the first index where the parent's ids and this prompt differ


def observe_append(parent: StoredIds, prompt_start: int, prompt: Sequence[int]) -> AppendObservation | None:
    """Are the parent's prompt and output ids an exact prefix of this turn's prompt, of which `prompt`
    holds the ids from `prompt_start` on? The ids before are the parent's own by the protocol, so only
    the rest is compared. None when the parent's stored ids do not reach back to `prompt_start` (a whole
    prompt needs its parent's whole: `rebuild`)."""
    offset = prompt_start - parent.prompt_start
    if offset < 0 or offset > len(parent.prompt):
        return None
    expected = [*parent.prompt[offset:], *parent.output]
    if list(prompt[: len(expected)]) == expected:
        return AppendObservation(True, None)
    for index, (want, got) in enumerate(zip(expected, prompt, strict=False)):
        if want != got:
            return AppendObservation(False, prompt_start + index)
    return AppendObservation(False, prompt_start + len(prompt))  # the prompt ends inside the parent's ids


@dataclass(frozen=True, slots=True)
class ParentClaim:
    """What the writer knows of a turn's parent: its record's fingerprint and safe-boundary claim (the
    first `safe_tokens` ids of the next prompt digest to `prefix_hash`), and its ids if stored."""

    fingerprint: str | None
    claimed_safe: bool
    safe_tokens: int | None
    prefix_hash: str | None
    tokens: StoredIds | None


@dataclass(frozen=True, slots=True)
class Observed:
    observation: AppendObservation | None  # None: not comparable
    diagnostic: dict[str, Any] | None  # set when the parent's record must be invalidated


def observe_turn(turn: TurnTokens, parent: ParentClaim | None) -> Observed:
    """The observation for one turn against its parent, comparable only under the same known fingerprint
    (another template, tools or instructions render another prompt by design).

    A contradiction is a parent record that claimed a safe boundary, a child that relied on it, and a
    prompt whose first `safe_tokens` ids are not the ones the claim names: the canary's check, on the
    ids the backend really generated from. (Generated ids that the template re-renders differently are
    not one: the claim is about the re-rendered reply; that shows as `append_safe` false.)"""
    if parent is None or parent.fingerprint is None or parent.fingerprint != turn.fingerprint:
        return Observed(None, None)
    observation = None
    if parent.tokens is not None:
        observation = observe_append(parent.tokens, turn.prompt_start, turn.prompt_ids)
    # A turn that continued the handle had its prefix verified by the backend (and only its end is here).
    if turn.prompt_start or not (
        parent.claimed_safe and turn.relied_on_parent and parent.safe_tokens and parent.prefix_hash
    ):
        return Observed(observation, None)
    claimed = turn.prompt_ids[: parent.safe_tokens]
    found = token_digest(claimed)
    if len(claimed) == parent.safe_tokens and found == parent.prefix_hash:
        return Observed(observation, None)
    diagnostic: dict[str, Any] = {
        "kind": CONTRADICTED,
        "parent_id": turn.parent_id,
        "claimed_tokens": parent.safe_tokens,
        "claimed_prefix_hash": parent.prefix_hash,
        "observed_prefix_hash": found,
    }
    if observation is not None and observation.divergence is not None and parent.tokens is not None:
        expected = [*parent.tokens.prompt, *parent.tokens.output]  # whole: this prompt is
        at = observation.divergence
        window = slice(max(at - DIAGNOSTIC_WINDOW, 0), at + DIAGNOSTIC_WINDOW)
        diagnostic.update(
            divergence=at,
            window_start=window.start,
            expected=expected[window],
            observed=list(turn.prompt_ids[window]),
        )
    return Observed(observation, diagnostic)


def artifact_row(turn: TurnTokens, observed: Observed) -> Mapping[str, Any]:
    """The token_artifacts row of a turn (packing and compressing: run it off the event loop)."""
    observation = observed.observation
    return {
        "response_id": turn.response_id,
        "tenant": turn.tenant,
        "model": turn.model,
        "template": turn.template,
        "parent_id": turn.parent_id,
        "fingerprint": turn.fingerprint,
        "decision": turn.decision,
        "prompt_count": turn.prompt_start + len(turn.prompt_ids),
        "output_count": len(turn.output_ids),
        "prompt_start": turn.prompt_start,
        "prompt_ids": pack(turn.prompt_ids),
        "output_ids": pack(turn.output_ids),
        "append_safe": observation.append_safe if observation else None,
        "divergence": observation.divergence if observation else None,
        "diagnostic": observed.diagnostic,
        "created_at": turn.created_at,
        "expires_at": turn.expires_at,
    }
