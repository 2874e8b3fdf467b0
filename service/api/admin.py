"""The admin API under /admin/v1: tenants, keys, inspection, scoped invalidation, stats, retention.

Admin keys are the operators' keys: they see and act on every tenant. Every route needs the admin role."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from service.api import admin_schemas as schemas
from service.api.body import CheckedRoute
from service.api.deps import admin
from service.api.errors import error_responses
from service.domain.artifacts import StoredIds, observe_append, rebuild, unpack
from service.domain.auth import Principal
from service.domain.invalidation import Scope, Subject, fingerprint_key, handle_state
from service.domain.stats import Summary, summarize
from service.errors import InvalidRequest, NotFound
from service.store.artifacts import ArtifactStore, StoredArtifact
from service.store.inspect import InspectedTurn
from service.store.invalidations import Change, StoredInvalidation
from service.store.keys import StoredKey, tenant_not_found
from service.store.tenants import StoredTenant
from service.workers.retention import retention_pass

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    dependencies=[Depends(admin)],
    route_class=CheckedRoute,
    responses=error_responses(400, 401, 403, 500, 503),
)
NOT_FOUND = error_responses(404)
log = logging.getLogger("convstate.admin")

Admin = Annotated[Principal, Depends(admin)]


def _tenant(tenant: StoredTenant) -> schemas.Tenant:
    return schemas.Tenant(
        id=tenant.id,
        created_at=tenant.created_at,
        response_ttl_days=tenant.response_ttl_days,
        salt_id=tenant.salt_id,
        replay_cache=tenant.replay_cache,
    )


@router.get("/tenants")
async def list_tenants(request: Request) -> schemas.Tenants:
    return schemas.Tenants(data=[_tenant(t) for t in await request.app.state.tenants.list()])


@router.post("/tenants")
async def create_tenant(body: schemas.CreateTenantBody, request: Request) -> schemas.Tenant:
    created = await request.app.state.tenants.create(body.id, body.response_ttl_days, time.time())
    if created is None:
        raise InvalidRequest(f"Tenant '{body.id}' already exists.", param="id", code="tenant_exists")
    return _tenant(created)


def _found(tenant_id: str, tenant: StoredTenant | None) -> schemas.Tenant:
    if tenant is None:
        raise tenant_not_found(tenant_id)
    return _tenant(tenant)


@router.get("/tenants/{tenant_id}", responses=NOT_FOUND)
async def get_tenant(tenant_id: str, request: Request) -> schemas.Tenant:
    return _found(tenant_id, await request.app.state.tenants.get(tenant_id))


@router.post("/tenants/{tenant_id}", responses=NOT_FOUND)
async def update_tenant(
    tenant_id: str, body: schemas.UpdateTenantBody, request: Request, caller: Admin
) -> schemas.Tenant:
    """Set the tenant's response retention (`null`: the service default; applies to new responses) and
    whether its requests use the replay cache by default; fields not sent are left as they are."""
    tenants = request.app.state.tenants
    now, sent = time.time(), body.model_fields_set
    updated = await tenants.get(tenant_id)
    if updated is not None and "response_ttl_days" in sent:
        updated = await tenants.set_retention(tenant_id, body.response_ttl_days, actor=caller.actor, now=now)
    if updated is not None and body.replay_cache is not None:
        updated = await tenants.set_replay_cache(tenant_id, body.replay_cache, actor=caller.actor, now=now)
    return _found(tenant_id, updated)


@router.post("/tenants/{tenant_id}/rotate_salt", responses=NOT_FOUND)
async def rotate_salt(
    tenant_id: str, body: schemas.ReasonBody, request: Request, caller: Admin
) -> schemas.Tenant:
    """A new cache salt: every handle of the tenant stops matching at once, on every replica within the
    max lag (`fingerprint_mismatch:cache_salt`)."""
    tenants = request.app.state.tenants
    rotated = await tenants.rotate_salt(tenant_id, actor=caller.actor, reason=body.reason, now=time.time())
    return _found(tenant_id, rotated)


@router.get("/keys")
async def list_keys(request: Request, tenant: str | None = None) -> schemas.Keys:
    return schemas.Keys(data=await request.app.state.keys.list(tenant))


@router.post("/keys", responses=NOT_FOUND)
async def create_key(body: schemas.CreateKeyBody, request: Request) -> schemas.CreatedKey:
    """A new key; the secret is in this answer only."""
    created, secret = await request.app.state.keys.create(body.tenant, body.role, body.name, time.time())
    return schemas.CreatedKey(**asdict(created), key=secret)


@router.post("/keys/{key_id}/revoke", responses=NOT_FOUND)
async def revoke_key(key_id: str, body: schemas.ReasonBody, request: Request, caller: Admin) -> StoredKey:
    """Refused on every replica within the max lag."""
    revoked: StoredKey | None = await request.app.state.keys.revoke(
        key_id, actor=caller.actor, reason=body.reason, now=time.time()
    )
    if revoked is None:
        raise NotFound(f"No key found with id '{key_id}'.", param="key_id")
    return revoked


def _turn(request: Request, turn: InspectedTurn, now: float) -> schemas.Turn:
    cutoff = None
    if turn.fingerprint_parts is not None:
        subject = Subject(
            turn.tenant,
            turn.model,
            turn.conversation_id,
            turn.lineage_root,
            turn.depth,
            turn.fingerprint_parts,
        )
        cutoff = request.app.state.watcher.cutoff(subject)
    decision = None
    if turn.decision_path is not None and turn.decision_reason is not None:
        decision = schemas.Decision(path=turn.decision_path, reason=turn.decision_reason)
    return schemas.Turn(
        id=turn.id,
        tenant=turn.tenant,
        model=turn.model,
        status=turn.status,
        conversation_id=turn.conversation_id,
        lineage_root=turn.lineage_root,
        depth=turn.depth,
        created_at=turn.created_at,
        expires_at=turn.expires_at,
        expired=turn.expires_at <= now,
        deleted=turn.deleted_at is not None,
        decision=decision,
        prompt_tokens=turn.prompt_tokens,
        cached_tokens=turn.cached_tokens,
        bytes_sent=turn.bytes_sent,
        prefix_hash=turn.prefix_hash,
        turn_tokens=turn.turn_tokens,
        safe_boundary=turn.safe_boundary,
        safe_tokens=turn.safe_tokens,
        covers_output=turn.covers_output,
        fingerprint=turn.fingerprint,
        fingerprint_parts=turn.fingerprint_parts,
        handle=schemas.Handle(
            state=handle_state(
                record_status=turn.record_status,
                invalid_reason=turn.invalid_reason,
                handle_ref=turn.handle_ref,
                handle_expires_at=turn.handle_expires_at,
                record_created_at=turn.record_created_at,
                cutoff=cutoff,
                now=now,
            ),
            ref=turn.handle_ref,
            endpoint=turn.handle_endpoint,
            epoch=turn.handle_epoch,
            expires_at=turn.handle_expires_at,
        ),
        append_safe=turn.append_safe,
        divergence=turn.divergence,
    )


@router.get("/responses/{response_id}/lineage", responses=NOT_FOUND)
async def inspect_lineage(response_id: str, request: Request) -> schemas.Inspection:
    """The response and its ancestors (through previous_response_id), oldest first, turn by turn."""
    turns = await request.app.state.inspect.lineage(response_id)
    if not turns:
        raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
    now = time.time()
    return schemas.Inspection(object="lineage", id=response_id, turns=[_turn(request, t, now) for t in turns])


@router.get("/conversations/{conversation_id}/turns")
async def inspect_conversation(conversation_id: str, request: Request) -> schemas.Inspection:
    """Every turn of the conversation, oldest first (an unknown conversation has none)."""
    turns = await request.app.state.inspect.conversation(conversation_id)
    now = time.time()
    return schemas.Inspection(
        object="conversation", id=conversation_id, turns=[_turn(request, t, now) for t in turns]
    )


async def _text(request: Request, model: str, token_ids: list[int]) -> str | None:
    """Ids as text through the backend's /detokenize; None (logged) when the backend cannot say."""
    try:
        text: str = await request.app.state.pipeline.backend.detokenize(model, token_ids)
    except Exception:
        log.warning("could not detokenize %d ids of %s", len(token_ids), model, exc_info=True)
        return None
    return text


async def _prompt(store: ArtifactStore, artifact: StoredArtifact) -> tuple[int, list[int]]:
    """An artifact's prompt ids, whole when its chain is (`(0, ids)`), else from its own start."""
    if artifact.prompt_start:
        chain = await store.chain(artifact.response_id)
        whole = await asyncio.to_thread(rebuild, chain.links) if chain else None
        if whole is not None:
            return 0, whole
    return artifact.prompt_start, unpack(artifact.prompt_ids)


async def _divergence(
    request: Request, artifact: StoredArtifact, parent: StoredArtifact, prompt: list[int], context: int
) -> schemas.Divergence | None:
    start, parent_prompt = await _prompt(request.app.state.artifacts, parent)
    if start:
        return None
    parent_output = unpack(parent.output_ids)
    expected = parent_prompt + parent_output
    observation = observe_append(StoredIds(0, parent_prompt, parent_output), 0, prompt)
    assert observation is not None  # both whole
    at = observation.divergence
    window = None if at is None else slice(max(at - context, 0), at + context)
    return schemas.Divergence(
        parent_id=parent.response_id,
        parent_tokens=len(expected),
        comparable=parent.fingerprint is not None and parent.fingerprint == artifact.fingerprint,
        append_safe=observation.append_safe,
        divergence=at,
        window_start=None if window is None else window.start,
        parent_text=None if window is None else await _text(request, artifact.model, expected[window]),
        text=None if window is None else await _text(request, artifact.model, prompt[window]),
    )


@router.get("/responses/{response_id}/artifact", responses=NOT_FOUND)
async def artifact(
    response_id: str, request: Request, context: Annotated[int, Query(ge=0, le=512)] = 16
) -> schemas.Artifact:
    """A turn's token artifact: the prompt and output ids the backend reported (the prompt whole, rebuilt
    from its ancestors' artifacts after a cache reference), and where the prompt leaves its parent's
    prompt + output ids, with `context` ids on each side as text (the backend's /detokenize)."""
    store = request.app.state.artifacts
    found: StoredArtifact | None = await store.get(response_id)
    if found is None:
        raise NotFound(f"No token artifact found for response '{response_id}'.", param="response_id")
    start, prompt = await _prompt(store, found)
    # Ids compare only when both prompts are whole.
    parent = await store.get(found.parent_id) if found.parent_id and not start else None
    return schemas.Artifact(
        response_id=found.response_id,
        tenant=found.tenant,
        model=found.model,
        template=found.template,
        parent_id=found.parent_id,
        fingerprint=found.fingerprint,
        decision=found.decision,
        prompt_tokens=found.prompt_count,
        output_tokens=found.output_count,
        prompt_token_ids_start=start,
        prompt_token_ids=prompt,
        output_token_ids=unpack(found.output_ids),
        append_safe=found.append_safe,
        divergence=await _divergence(request, found, parent, prompt, context) if parent else None,
        diagnostic=found.diagnostic,
        created_at=found.created_at,
        expires_at=found.expires_at,
    )


@router.get("/append_safety")
async def append_safety(request: Request, model: str | None = None) -> schemas.AppendSafety:
    """Observed append-safety per model and template: turns compared with their parent's ids, how many
    were an exact continuation, and how many contradicted a record's safe-boundary claim."""
    groups = await request.app.state.artifacts.append_safety(model)
    return schemas.AppendSafety(
        data=[
            schemas.AppendSafetyGroup(
                model=group.model,
                template=group.template,
                observed=group.observed,
                append_safe=group.safe,
                rate=group.safe / group.observed,
                contradicted=group.contradicted,
            )
            for group in groups
        ]
    )


async def _rule_target(
    request: Request, body: schemas.InvalidateBody
) -> tuple[str | None, str | None, int | None]:
    """(key, lineage root, depth) of the rule the body asks for; 400/404 for a target that cannot be."""
    scope = Scope(body.scope)
    if scope is Scope.ALL:
        if body.key is not None:
            raise InvalidRequest("scope 'all' takes no key.", param="key")
        return None, None, None
    if not body.key:
        raise InvalidRequest(f"scope '{scope}' needs a key.", param="key")
    if body.part is not None and scope is not Scope.FINGERPRINT:
        raise InvalidRequest("'part' applies to the fingerprint scope only.", param="part")
    if scope is Scope.FINGERPRINT:
        try:
            return fingerprint_key(body.part, body.key), None, None
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="part") from None
    if scope is Scope.RESPONSE:
        position = await request.app.state.invalidations.lineage_position(body.key)
        if position is None:
            raise NotFound(f"No response found with id '{body.key}'.", param="key")
        return body.key, *position
    if scope is Scope.TENANT and await request.app.state.tenants.get(body.key) is None:
        raise tenant_not_found(body.key)
    return body.key, None, None


@router.post("/invalidations", responses=NOT_FOUND)
async def invalidate(body: schemas.InvalidateBody, request: Request, caller: Admin) -> StoredInvalidation:
    """One row whatever the scope covers; every replica decides `full; reason=invalidated` for the
    covered records within the max lag. A response scope covers the response and its descendants."""
    key, root, depth = await _rule_target(request, body)
    change = Change(Scope(body.scope), key, body.reason, caller.actor, time.time(), root, depth)
    row: StoredInvalidation = await request.app.state.invalidations.add(change)
    request.app.state.watcher.made_here(row)
    return row


@router.get("/invalidations")
async def list_invalidations(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> schemas.Invalidations:
    """The audit log (invalidations, salt rotations, retention changes, key revocations), newest first."""
    rows = await request.app.state.invalidations.recent(limit + 1, before)
    return schemas.Invalidations(data=rows[:limit], has_more=len(rows) > limit)


def _group(summary: Summary) -> schemas.StatsGroup:
    return schemas.StatsGroup(
        tenant=summary.tenant,
        model=summary.model,
        turns=summary.turns,
        reused=summary.reused,
        hit_rate=summary.hit_rate,
        fallbacks=summary.fallbacks,
        prompt_tokens=summary.prompt_tokens,
        cached_tokens=summary.cached_tokens,
        bytes_sent=summary.bytes_sent,
        decisions=summary.decisions,
    )


@router.get("/stats")
async def stats(
    request: Request, tenant: str | None = None, model: str | None = None, since: float | None = None
) -> schemas.Stats:
    """Stored turns' decisions by path and reason, hit rate, fallbacks and tokens, per tenant and model."""
    total, groups = summarize(await request.app.state.inspect.decisions(tenant, model, since))
    return schemas.Stats(total=_group(total), groups=[_group(group) for group in groups])


@router.post("/retention/run")
async def run_retention(request: Request) -> schemas.RetentionRun:
    """A retention pass now, instead of waiting for the worker's next one."""
    state = request.app.state
    batch = state.settings.retention_batch
    return schemas.RetentionRun(
        deleted_responses=await retention_pass(state.retention.purge, batch),
        deleted_artifacts=await retention_pass(state.artifacts.purge, batch),
        deleted_stream_events=await retention_pass(state.events.purge, batch),
    )
