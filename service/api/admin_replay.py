"""The replay cache's admin API under /admin/v1/replay, with its bodies: statistics, listing (and, with
`whole`, the paged export), deletion by tenant, model, key prefix and age, and import.

Every route needs the admin role, like the rest of the admin API; a selection covers ready entries
only (a claim under way is never listed or deleted)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from service.api.body import CheckedRoute
from service.api.deps import admin
from service.api.errors import error_responses
from service.errors import InvalidRequest
from service.replay import TURN_REPLY_FIELDS
from service.store.replay import Entry, ReplayStore, Selection

router = APIRouter(
    prefix="/admin/v1/replay",
    tags=["admin"],
    dependencies=[Depends(admin)],
    route_class=CheckedRoute,
    responses=error_responses(400, 401, 403, 500, 503),
)

MAX_PAGE = 1000
KeyPrefix = Field(default=None, pattern=r"^[0-9a-f]{1,64}$", description="the first hex digits of keys")
OlderThan = Field(default=None, ge=0, description="only entries created at least this many seconds ago")


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=256)
    key_prefix: str | None = KeyPrefix
    older_than: float | None = OlderThan

    def selection(self) -> Selection:
        created_before = None if self.older_than is None else time.time() - self.older_than
        return Selection(self.tenant, self.model, self.key_prefix, created_before)


class DeleteBody(Filters):
    all: bool = Field(default=False, description="required to delete every entry (no filter)")


class EntryBody(BaseModel):
    """One entry as exported: what an import takes back."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=64)
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    endpoint: Literal["chat.completions", "completions", "responses"]
    model: str = Field(max_length=256)
    fingerprint: str | None = Field(max_length=64)
    status: Literal["ready"] = "ready"
    bytes: int = Field(ge=0, le=2**31 - 1)
    created_at: float = Field(ge=0)
    expires_at: float = Field(ge=0)
    request: dict[str, Any]
    result: dict[str, Any]


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: list[EntryBody] = Field(max_length=MAX_PAGE)


class ModelStats(BaseModel):
    tenant: str
    model: str
    entries: int
    bytes: int
    oldest: float
    newest: float


class Stats(BaseModel):
    data: list[ModelStats]
    entries: int
    bytes: int


class Entries(BaseModel):
    data: list[dict[str, Any]]
    next: str | None = Field(description="pass as `after` for the next page; null on the last")


class Deleted(BaseModel):
    deleted: int


class Imported(BaseModel):
    imported: int


def _store(request: Request) -> ReplayStore:
    store: ReplayStore = request.app.state.replay
    return store


def _query_filters(
    tenant: str | None = None,
    model: str | None = None,
    key_prefix: Annotated[str | None, Query(pattern=r"^[0-9a-f]{1,64}$")] = None,
    older_than: Annotated[float | None, Query(ge=0)] = None,
) -> Filters:
    return Filters(tenant=tenant, model=model, key_prefix=key_prefix, older_than=older_than)


QueryFilters = Annotated[Filters, Depends(_query_filters)]


@router.get("/stats")
async def stats(request: Request, filters: QueryFilters) -> Stats:
    """Entries and their bytes per tenant and model."""
    groups = await _store(request).stats(filters.selection())
    return Stats(
        data=[ModelStats(**asdict(group)) for group in groups],
        entries=sum(group.entries for group in groups),
        bytes=sum(group.bytes for group in groups),
    )


def _cursor(after: str | None) -> tuple[float, str] | None:
    if after is None:
        return None
    created_at, _, key = after.partition("/")
    try:
        return float(created_at), key
    except ValueError:
        raise InvalidRequest("'after' is not a cursor this API returned.", param="after") from None


@router.get("/entries")
async def entries(
    request: Request,
    filters: QueryFilters,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[str | None, Query(max_length=200)] = None,
    whole: bool = False,
) -> Entries:
    """The selected entries, oldest first, a page at a time; with `whole`, each with its canonical request
    and stored reply (the export: one entry per line of a JSONL file)."""
    page = await _store(request).list(filters.selection(), limit, after=_cursor(after), whole=whole)
    rows = [_entry(entry, whole) for entry in page]
    last = page[-1] if len(page) == limit else None
    return Entries(data=rows, next=None if last is None else f"{last.created_at!r}/{last.key}")


def _entry(entry: Entry, whole: bool) -> dict[str, Any]:
    row = asdict(entry)
    if not whole:
        del row["request"], row["result"]
    return row


@router.post("/delete")
async def delete(body: DeleteBody, request: Request) -> Deleted:
    """Delete the selected entries; with no filter, only with `all: true`."""
    if not body.all and body.model_dump(exclude={"all"}, exclude_none=True) == {}:
        raise InvalidRequest(
            "Name a tenant, model, key_prefix or older_than, or set 'all' to delete every entry.",
            param="all",
            code="missing_required_parameter",
        )
    return Deleted(deleted=await _store(request).delete(body.selection()))


@router.post("/import")
async def import_entries(body: ImportBody, request: Request) -> Imported:
    """Entries as exported (up to 1,000 a call), stored ready; an existing entry keeps the newer one."""
    # One row per key: a batch that holds a key twice keeps the newer.
    newest: dict[tuple[str, str], EntryBody] = {}
    for index, entry in enumerate(body.entries):
        missing = set(TURN_REPLY_FIELDS) - set(entry.result) if entry.endpoint == "responses" else set()
        if missing:
            # A Responses turn is rebuilt from these on a hit: refused here, not answered wrong later.
            raise InvalidRequest(
                f"A 'responses' entry's result needs '{sorted(missing)[0]}'.",
                param=f"entries[{index}].result",
                code="invalid_value",
            )
        kept = newest.get((entry.tenant, entry.key))
        if kept is None or entry.created_at > kept.created_at:
            newest[entry.tenant, entry.key] = entry
    loaded = [Entry(**entry.model_dump()) for entry in newest.values()]
    return Imported(imported=await _store(request).load(loaded))
