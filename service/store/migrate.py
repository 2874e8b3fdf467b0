"""Run alembic programmatically, and tell whether a database is at head (for /readyz)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations

SCRIPT_LOCATION = str(Path(migrations.__file__).parent)


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Blocking: alembic runs its own event loop inside env.py."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


@cache
def _scripts() -> ScriptDirectory:
    """The migration scripts shipped with this code (read once: /readyz asks on every probe)."""
    return ScriptDirectory.from_config(alembic_config(""))


def head_revision() -> str | None:
    return _scripts().get_current_head()


def behind_head(revision: str | None) -> bool:
    """Whether a database at `revision` is too old for this code: no schema, or a revision this code knows
    that is not its head. A revision it does not know was written by a newer release; migrations only add
    what older code ignores, so this code still serves on it (both run during a rolling update)."""
    if revision is None:
        return True
    try:
        _scripts().get_revision(revision)
    except CommandError:
        return False
    return revision != head_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
