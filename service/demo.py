"""`convstate demo`: the reference backend and the service on loopback, a conversation through the SDK."""

from __future__ import annotations

import httpx
import openai
import typer

from service.app import create_app
from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app as create_reference_app
from service.config import AuthMode, load_settings
from service.domain.auth import Role
from service.serving import ServerThread
from service.store.keys import provision_key
from service.store.migrate import upgrade

PROMPTS = (
    "Hello! Give me a one-line summary of prefix caching.",
    "Why does re-sending the whole history cost so much?",
    "What is a safe boundary in a chat template?",
    "How would llm-d route this conversation?",
    "And what happens when the backend restarts?",
    "Summarise what we discussed.",
)


def run_demo(database_url: str, *, turns: int, mode: str, model: str, restart_at: int) -> None:
    upgrade(database_url)
    # The service runs as deployed, with API keys (not CONVSTATE_AUTH=none), so what the demo shows
    # includes authentication: the key is checked once, then served from the process's cache.
    api_key = provision_key(database_url, "demo", Role.USER, "demo")
    with ServerThread(create_reference_app(ReferenceSettings())) as backend:
        settings = load_settings(
            database_url=database_url, backend_url=backend.url, backend_mode=mode, auth=AuthMode.API_KEY
        )
        with ServerThread(create_app(settings)) as service, httpx.Client(base_url=backend.url) as admin:
            client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=api_key)
            typer.echo(
                f"convstate demo: mode={mode} model={model} backend={backend.url} service={service.url}"
                " tenant=demo (API key)"
            )
            typer.echo(
                f"{'turn':>4}  {'response id':<53} {'decision':<36} {'rendered':>8} {'bytes':>7}  digest"
            )
            previous: str | None = None
            for turn in range(1, turns + 1):
                if turn == restart_at:
                    admin.post("/admin/restart").raise_for_status()
                    typer.echo("      -- backend restarted: new epoch, every handle gone --")
                rendered_before = admin.get("/stats").json()["tokens_rendered"]
                raw = client.responses.with_raw_response.create(
                    model=model,
                    instructions="You are a concise assistant.",
                    input=PROMPTS[(turn - 1) % len(PROMPTS)],
                    previous_response_id=previous,
                    max_output_tokens=48,
                )
                response = raw.parse()
                rendered = admin.get("/stats").json()["tokens_rendered"] - rendered_before
                decision = raw.headers.get("x-convstate-decision", "?")
                typer.echo(
                    f"{turn:>4}  {response.id:<53} {decision:<36} {rendered:>8} "
                    f"{raw.headers.get('x-convstate-bytes-sent', '?'):>7}  "
                    f"{raw.headers.get('x-convstate-prompt-digest', '-')}"
                )
                previous = response.id
            typer.echo(f"last answer: {response.output_text[:100]}")
