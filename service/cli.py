"""The `convstate` command: serve, migrate, refbackend, demo."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from service.config import load_settings
from service.logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="convstate: conversation state for vLLM.")


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
        )
        return
    service = create_app(settings)
    config = uvicorn.Config(
        service, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
