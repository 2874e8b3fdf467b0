"""The `convstate` command: serve, migrate, refbackend, demo, tenants, keys, admin, cache."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
import uvicorn

from service.config import load_settings
from service.logs import configure_logging

if TYPE_CHECKING:
    from convstate_client import Client
    from sqlalchemy.ext.asyncio import AsyncEngine

app = typer.Typer(add_completion=False, no_args_is_help=True, help="convstate: conversation state for vLLM.")
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants, directly in CONVSTATE_DATABASE_URL.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys, directly in CONVSTATE_DATABASE_URL.")
admin_app = typer.Typer(no_args_is_help=True, help="The admin API of a running service, over HTTP.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(admin_app, name="admin")
T = TypeVar("T")
# The replay cache's admin API; the page size of an export and the batch size of an import.
CACHE_PAGE = 1000


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="listen address (CONVSTATE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (CONVSTATE_PORT)")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes (CONVSTATE_WORKERS)")] = None,
) -> None:
    """Run the service. SIGTERM drains one worker first (CONVSTATE_SHUTDOWN_GRACE_SECONDS)."""
    from service.app import create_app
    from service.serving import DrainingServer

    options = (("host", host), ("port", port), ("workers", workers))
    overrides = {key: value for key, value in options if value is not None}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    if settings.workers > 1:
        # Several workers are separate processes: each builds its app from the environment it inherits.
        # uvicorn's supervisor stops them: each stops accepting at once, then finishes its connections.
        uvicorn.run(
            "service.app:app_from_environment",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=None,
            access_log=False,  # the service writes its own (service/logs.py)
        )
        return
    service = create_app(settings)
    config = uvicorn.Config(
        service,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,  # the service writes its own (service/logs.py)
    )
    DrainingServer(config, lambda: service.state.pipeline.drain(settings.shutdown_grace_seconds)).run()


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
    down: Annotated[bool, typer.Option(help="downgrade to REVISION instead")] = False,
) -> None:
    """Apply alembic migrations to CONVSTATE_DATABASE_URL."""
    from service.store import migrate as migrations

    settings = load_settings()
    if down:
        migrations.downgrade(settings.database_url, revision)
    else:
        migrations.upgrade(settings.database_url, revision)
    typer.echo(f"database at {migrations.head_revision() if not down else revision}")


@app.command()
def refbackend(
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    port: Annotated[int | None, typer.Option(help="listen port")] = None,
) -> None:
    """Run the reference backend (a vLLM stand-in with the prompt_cache extension)."""
    from service.backends.reference.config import ReferenceSettings
    from service.backends.reference.server import create_app

    overrides = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    settings = ReferenceSettings(**overrides)  # type: ignore[arg-type]
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")


@app.command()
def demo(
    turns: Annotated[int, typer.Option(min=2, help="turns in the conversation")] = 8,
    mode: Annotated[str, typer.Option(help="backend mode: full, cache_ref or affinity")] = "cache_ref",
    model: Annotated[str, typer.Option(help="reference backend model (its template profile)")] = "ref-chatml",
    restart_at: Annotated[int, typer.Option(help="restart the backend before this turn (0: never)")] = 5,
) -> None:
    """Run a multi-turn conversation through the real HTTP API against the reference backend."""
    from service.demo import run_demo

    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="convstate-demo-") as tmp:
        database_url = f"sqlite+aiosqlite:///{Path(tmp) / 'demo.db'}"
        run_demo(database_url, turns=turns, mode=mode, model=model, restart_at=restart_at)


def _on_database(work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `work` against CONVSTATE_DATABASE_URL (migrated: `convstate migrate`)."""
    from service.store.db import create_engine, dispose

    async def run() -> T:
        engine = create_engine(load_settings().database_url)
        try:
            return await work(engine)
        finally:
            await dispose(engine)

    return asyncio.run(run())


def _echo_json(value: Any, *, err: bool = False) -> None:
    typer.echo(json.dumps(value, indent=2, default=str), err=err)


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="tenant id")],
    ttl_days: Annotated[
        float | None, typer.Option(help="response retention (default: the service's)")
    ] = None,
) -> None:
    """Create a tenant (with its own cache salt)."""
    from service.store.tenants import TenantStore

    created = _on_database(lambda engine: TenantStore(engine).create(name, ttl_days, time.time()))
    if created is None:
        raise SystemExit(f"convstate: tenant {name!r} already exists")
    typer.echo(f"tenant {created.id} created")


@tenants_app.command("list")
def tenants_list() -> None:
    """Every tenant: id, retention, salt id."""
    from service.store.tenants import TenantStore

    for tenant in _on_database(lambda engine: TenantStore(engine).list()):
        ttl = "default" if tenant.response_ttl_days is None else f"{tenant.response_ttl_days:g}d"
        typer.echo(f"{tenant.id}\tretention={ttl}\tsalt_id={tenant.salt_id}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the key's tenant (must exist)")],
    role: Annotated[str, typer.Option(help="user or admin")] = "user",
    name: Annotated[str, typer.Option(help="a label")] = "",
) -> None:
    """Create a key and print it once: it is stored only as its hash."""
    from service.domain.auth import Role
    from service.errors import NotFound
    from service.store.keys import KeyStore

    try:
        key_role = Role(role)
    except ValueError:
        raise SystemExit(f"convstate: --role must be user or admin, not {role!r}") from None
    try:
        created, secret = _on_database(
            lambda engine: KeyStore(engine).create(tenant, key_role, name, time.time())
        )
    except NotFound:
        raise SystemExit(
            f"convstate: no tenant {tenant!r}; create it with `convstate tenants create`"
        ) from None
    typer.echo(f"# key {created.id} ({created.role}) for tenant {created.tenant}; shown once:", err=True)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="only this tenant's")] = None) -> None:
    """Keys (never their secrets)."""
    from service.store.keys import KeyStore

    for key in _on_database(lambda engine: KeyStore(engine).list(tenant)):
        state = "active" if key.revoked_at is None else "revoked"
        typer.echo(f"{key.id}\t{key.tenant}\t{key.role}\t{state}\t{key.name}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (from `keys list`)")],
    reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "revoked",
) -> None:
    """Revoke a key: refused by every replica within the invalidation max lag."""
    from service.store.keys import KeyStore

    revoked = _on_database(
        lambda engine: KeyStore(engine).revoke(key_id, actor="cli", reason=reason, now=time.time())
    )
    if revoked is None:
        raise SystemExit(f"convstate: no key {key_id!r}")
    typer.echo(f"key {revoked.id} revoked")


@admin_app.callback()
def admin_connection(
    context: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="CONVSTATE_ADMIN_URL", help="the service")
    ] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(envvar="CONVSTATE_ADMIN_KEY", help="an admin key")] = "",
) -> None:
    try:
        from convstate_client import Client
    except ImportError:
        raise SystemExit(
            "convstate: `convstate admin` needs convstate-client (pip install ./clients/python)"
        ) from None
    context.obj = Client(url, key)


def _call(context: typer.Context, call: Callable[[Client], Any], *, err: bool = False) -> None:
    from convstate_client import ApiError

    client: Client = context.obj
    try:
        _echo_json(call(client), err=err)
    except ApiError as exc:
        raise SystemExit(f"convstate: {exc}") from None
    finally:
        client.close()


@admin_app.command("inspect")
def admin_inspect(context: typer.Context, response_id: str) -> None:
    """A response's lineage, turn by turn: decision, prefix record, handle state."""
    _call(context, lambda client: client.lineage(response_id))


@admin_app.command("conversation")
def admin_conversation(context: typer.Context, conversation_id: str) -> None:
    """A conversation's turns, like `inspect`."""
    _call(context, lambda client: client.conversation_turns(conversation_id))


@admin_app.command("artifact")
def admin_artifact(context: typer.Context, response_id: str, around: int = 16) -> None:
    """A turn's token ids and where its prompt leaves its parent's ids, as text (`around` ids each side)."""
    _call(context, lambda client: client.artifact(response_id, around))


@admin_app.command("append-safety")
def admin_append_safety(context: typer.Context, model: str | None = None) -> None:
    """Observed append-safety per model and template."""
    _call(context, lambda client: client.append_safety(model))


@admin_app.command("invalidate")
def admin_invalidate(
    context: typer.Context,
    scope: Annotated[str, typer.Argument(help="response, conversation, tenant, model, fingerprint or all")],
    key: Annotated[str | None, typer.Argument(help="what the scope names (none for all)")] = None,
    reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "operator request",
    part: Annotated[str | None, typer.Option(help="fingerprint scope: the part the hash is of")] = None,
) -> None:
    """Invalidate every handle in the scope (the service checks the scope's name)."""
    _call(context, lambda client: client.invalidate(cast(Any, scope), key, reason=reason, part=part))


@admin_app.command("invalidations")
def admin_invalidations(context: typer.Context, limit: int = 50) -> None:
    """The audit log, newest first."""
    _call(context, lambda client: client.invalidations(limit))


@admin_app.command("stats")
def admin_stats(context: typer.Context, tenant: str | None = None, model: str | None = None) -> None:
    """Decisions, hit rate, fallbacks and tokens per tenant and model."""
    _call(context, lambda client: client.stats(tenant, model))


@admin_app.command("rotate-salt")
def admin_rotate_salt(
    context: typer.Context, tenant: str, reason: Annotated[str, typer.Option()] = "salt rotation"
) -> None:
    """A new cache salt for the tenant: none of its handles is reused after it."""
    _call(context, lambda client: client.rotate_salt(tenant, reason))


@admin_app.command("retention")
def admin_retention(context: typer.Context) -> None:
    """Run a retention pass now."""
    _call(context, lambda client: client.run_retention())


cache_app = typer.Typer(
    no_args_is_help=True,
    callback=admin_connection,
    help="The replay cache of a running service, through its admin API (as `convstate admin`).",
)
app.add_typer(cache_app, name="cache")

TenantOption = Annotated[str | None, typer.Option(help="only this tenant's entries")]
ModelOption = Annotated[str | None, typer.Option(help="only this model's entries")]


@dataclass(frozen=True, slots=True)
class _Selection:
    """The entries a cache command acts on, as the admin API filters them."""

    tenant: str | None
    model: str | None
    key_prefix: str | None
    older_than: float | None

    def filters(self) -> tuple[str | None, str | None, str | None, float | None]:
        return self.tenant, self.model, self.key_prefix, self.older_than


# The selection's options, declared once for every command that takes a `_Selection` (`_selecting`).
_SELECTION_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
    for name, annotation in (
        ("tenant", TenantOption),
        ("model", ModelOption),
        ("key_prefix", Annotated[str | None, typer.Option(help="only keys starting with these hex digits")]),
        (
            "older_than",
            Annotated[float | None, typer.Option(help="only entries at least this many seconds old")],
        ),
    )
]


def _selecting(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with the selection's options in place of its `selection` parameter: typer reads the
    signature, so the options are given to it there."""
    signature = inspect.signature(command, eval_str=True)
    own = [parameter for parameter in signature.parameters.values() if parameter.name != "selection"]
    names = [option.name for option in _SELECTION_OPTIONS]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        selection = _Selection(*(kwargs.pop(name) for name in names))
        command(*args, selection=selection, **kwargs)

    parameters = [*own, *_SELECTION_OPTIONS]
    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return run


@cache_app.command("stats")
def cache_stats(context: typer.Context, tenant: TenantOption = None, model: ModelOption = None) -> None:
    """Entries and bytes per tenant and model."""
    _call(context, lambda client: client.replay_stats(tenant, model))


@cache_app.command("list")
@_selecting
def cache_list(context: typer.Context, selection: _Selection, limit: int = 100) -> None:
    """The oldest selected entries (without their requests and replies)."""
    _call(context, lambda client: client.replay_entries(*selection.filters(), limit=limit))


@cache_app.command("delete")
@_selecting
def cache_delete(context: typer.Context, selection: _Selection) -> None:
    """Delete the selected entries (name at least one filter; `clear` deletes all)."""
    _call(context, lambda client: client.replay_delete(*selection.filters()))


@cache_app.command("clear")
def cache_clear(context: typer.Context) -> None:
    """Delete every entry."""
    _call(context, lambda client: client.replay_delete(all=True))


@cache_app.command("export")
@_selecting
def cache_export(context: typer.Context, selection: _Selection) -> None:
    """The selected entries with their requests and replies, as JSONL on stdout, oldest first."""

    def export(client: Client) -> dict[str, int]:
        after, count = None, 0
        while True:
            page = client.replay_entries(*selection.filters(), limit=CACHE_PAGE, after=after, whole=True)
            for entry in page["data"]:
                typer.echo(json.dumps(entry, separators=(",", ":")))
            count += len(page["data"])
            after = page["next"]
            if after is None:
                return {"exported": count}

    _call(context, export, err=True)  # stdout is the JSONL


@cache_app.command("import")
def cache_import(
    context: typer.Context,
    source: Annotated[Path, typer.Argument(help="a JSONL export (- for stdin)")] = Path("-"),
) -> None:
    """Entries from a JSONL export; an existing entry keeps the newer of the two."""

    def load(client: Client) -> dict[str, int]:
        imported, batch = 0, []
        with nullcontext(sys.stdin) if str(source) == "-" else source.open() as lines:
            for line in lines:
                if line.strip():
                    batch.append(json.loads(line))
                if len(batch) == CACHE_PAGE:
                    imported += client.replay_import(batch)["imported"]
                    batch = []
        if batch:
            imported += client.replay_import(batch)["imported"]
        return {"imported": imported}

    _call(context, load)


@cache_app.command("enable")
def cache_enable(context: typer.Context, tenant: str) -> None:
    """The tenant's requests use the replay cache unless they say otherwise."""
    _call(context, lambda client: client.set_replay_cache(tenant, True))


@cache_app.command("disable")
def cache_disable(context: typer.Context, tenant: str) -> None:
    """The tenant's requests use the replay cache only when they ask for it."""
    _call(context, lambda client: client.set_replay_cache(tenant, False))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
